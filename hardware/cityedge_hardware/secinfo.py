"""What ``esptool get-security-info`` tells when Secure Download Mode hides the eFuse summary.

A chip in Secure Download Mode refuses eFuse reads, so ``espefuse summary`` fails; its ROM
still answers GET_SECURITY_INFO (ESP32-S2 and later; the ESP32 has no such command). The
answer is a flags word, the six key purposes, the flash crypt counter and the chip id.
``parse_security_info`` reads esptool 5.x's text for it (the ``Flags: 0x...`` line is the
source of truth, the other lines only render it) and ``check_security_info`` decides the
eFuse requirements it can:

1. ``download-mode``: the answer came back from Secure Download Mode (flag bit 2), so ROM
   download is restricted: pass. Without the flag: fail.
2. ``secure-boot``: flag bit 0.
3. ``secure-boot-keys``: the key purposes and the three revoke flags (bits 3-5), as the
   summary rule; a digest's block contents are not reported, so a burned purpose counts.
4. ``flash-encryption``: the counter's parity; whether it is write-protected is not
   reported: an odd counter is "could not decide" (release mode unknown), an even one fails.
5. ``flash-key-hidden``: not reported (read protection): could not decide.
6. ``jtag-off``: the hard-disable flag (bit 7) covers the JTAG pins; on chips with USB-JTAG
   the USB path is not reported: could not decide unless the pins are open (then fail).
7. ``config-locked``: write protection is not reported: could not decide.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from cityedge_hardware.efuse_chips import (
    FLASH_KEY_PURPOSES,
    PURPOSE_NAMES,
    PURPOSE_SECURE_BOOT_DIGEST,
)
from cityedge_hardware.efuse_rules import (
    REQ_CONFIG_LOCKED,
    REQ_DOWNLOAD_MODE,
    REQ_FLASH_ENCRYPTION,
    REQ_FLASH_KEY_HIDDEN,
    REQ_JTAG_OFF,
    REQ_SECURE_BOOT,
    REQ_SECURE_BOOT_KEYS,
)
from cityedge_hardware.errors import EfuseDataError
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

# GET_SECURITY_INFO flag bits (the ROM's, as esptool's loader names them)
FLAG_SECURE_BOOT_EN = 1 << 0
FLAG_SECURE_BOOT_AGGRESSIVE_REVOKE = 1 << 1
FLAG_SECURE_DOWNLOAD_ENABLE = 1 << 2
FLAG_SECURE_BOOT_KEY_REVOKE = (1 << 3, 1 << 4, 1 << 5)
FLAG_SOFT_DIS_JTAG = 1 << 6
FLAG_HARD_DIS_JTAG = 1 << 7

# chip ids the ROM reports (esptool's IMAGE_CHIP_ID) and whether the chip has USB-JTAG
CHIP_IDS = {2: ("esp32s2", False), 5: ("esp32c3", True), 9: ("esp32s3", True),
            12: ("esp32c2", False), 13: ("esp32c6", True), 16: ("esp32h2", True),
            18: ("esp32p4", True), 20: ("esp32c61", True), 23: ("esp32c5", True),
            25: ("esp32h21", True), 28: ("esp32h4", True), 31: ("esp32e22", False),
            32: ("esp32s31", True)}

_FLAGS = re.compile(r"^Flags:\s*(0x[0-9a-fA-F]+)", re.M)
_PURPOSES = re.compile(r"^Key Purposes:\s*(\[[0-9,\s]*\]|\([0-9,\s]*\))", re.M)
_CHIP_ID = re.compile(r"^Chip ID:\s*(\d+)", re.M)
_CRYPT_CNT = re.compile(r"^(?:SPI Boot|Flash) Crypt Count \((\w+)\):\s*(0x[0-9a-fA-F]+)", re.M)


@dataclass(frozen=True)
class SecurityInfo:
    flags: int
    key_purposes: tuple[int, ...]
    crypt_count: int | None
    chip_id: int | None

    @property
    def chip(self) -> str | None:
        entry = CHIP_IDS.get(self.chip_id) if self.chip_id is not None else None
        return entry[0] if entry else None


def parse_security_info(text: str) -> SecurityInfo:
    """Read ``esptool get-security-info`` output; ``EfuseDataError`` when it is not that."""
    if len(text) > LIMITS.secinfo_max_bytes:
        raise EfuseDataError("get-security-info output of %d bytes, more than %d"
                             % (len(text), LIMITS.secinfo_max_bytes))
    flags = _FLAGS.search(text)
    if flags is None:
        raise EfuseDataError("get-security-info output has no 'Flags:' line",
                             hint="the chip may be an ESP32, which has no security info "
                             "command: use `--efuse-json` with a summary captured before "
                             "download mode was restricted")
    purposes: tuple[int, ...] = ()
    m = _PURPOSES.search(text)
    if m is not None:
        value = ast.literal_eval(m.group(1))
        purposes = tuple(int(p) for p in value)[:6]
    cnt = _CRYPT_CNT.search(text)
    chip_id = _CHIP_ID.search(text)
    return SecurityInfo(flags=int(flags.group(1), 16), key_purposes=purposes,
                        crypt_count=int(cnt.group(2), 16) if cnt else None,
                        chip_id=int(chip_id.group(1)) if chip_id else None)


def _flag(info: SecurityInfo, name: str, bit: int) -> Evidence:
    return Evidence("security-info " + name, "1" if info.flags & bit else "0")


def check_security_info(info: SecurityInfo) -> list[Verdict]:
    """The verdicts security info supports, in the summary rules' order (see the docstring)."""
    flags = info.flags
    fix_summary = ("capture `espefuse summary --format json` before Secure Download Mode is "
                   "enabled and pass it with --efuse-json")
    out: list[Verdict] = []
    ev: tuple[Evidence, ...] = (_flag(info, "SECURE_BOOT_EN", FLAG_SECURE_BOOT_EN),)
    out.append(Verdict(REQ_SECURE_BOOT, "secure-boot",
                       Outcome.PASS if flags & FLAG_SECURE_BOOT_EN else Outcome.FAIL,
                       "secure boot is %s" % ("on" if flags & FLAG_SECURE_BOOT_EN else "off"),
                       ev, "" if flags & FLAG_SECURE_BOOT_EN else
                       "enable secure boot v2 in the bootloader build"))
    slots = {PURPOSE_SECURE_BOOT_DIGEST.index(p) for p in info.key_purposes
             if p in PURPOSE_SECURE_BOOT_DIGEST}
    revoked = {i for i, bit in enumerate(FLAG_SECURE_BOOT_KEY_REVOKE) if flags & bit}
    ev = tuple(Evidence("security-info KEY_PURPOSE_%d" % n, str(p), PURPOSE_NAMES.get(p, ""))
               for n, p in enumerate(info.key_purposes))
    ev += tuple(_flag(info, "SECURE_BOOT_KEY_REVOKE%d" % i, b)
                for i, b in enumerate(FLAG_SECURE_BOOT_KEY_REVOKE))
    if not info.key_purposes:
        out.append(Verdict(REQ_SECURE_BOOT_KEYS, "secure-boot-keys", Outcome.UNDECIDED,
                           "the chip reported no key purposes", ev, fix_summary))
    elif not slots - revoked:
        out.append(Verdict(REQ_SECURE_BOOT_KEYS, "secure-boot-keys", Outcome.FAIL,
                           "no secure boot digest that is not revoked", ev,
                           "burn the digest of the release signing key into a free slot"))
    elif {0, 1, 2} - slots - revoked:
        open_slots = sorted({0, 1, 2} - slots - revoked)
        out.append(Verdict(REQ_SECURE_BOOT_KEYS, "secure-boot-keys", Outcome.FAIL,
                           "slot(s) %s have no digest and are not revoked"
                           % ", ".join(map(str, open_slots)), ev,
                           "; ".join("`espefuse --port PORT burn-efuse SECURE_BOOT_KEY_REVOKE%d"
                                     " 1` (before Secure Download Mode)" % s
                                     for s in open_slots)))
    else:
        out.append(Verdict(REQ_SECURE_BOOT_KEYS, "secure-boot-keys", Outcome.PASS,
                           "digest slot(s) %s in use, the others revoked"
                           % ", ".join(map(str, sorted(slots - revoked))), ev))
    if info.crypt_count is None:
        out.append(Verdict(REQ_FLASH_ENCRYPTION, "flash-encryption", Outcome.UNDECIDED,
                           "the chip reported no flash crypt counter", (), fix_summary))
    else:
        ev = (Evidence("security-info crypt count", hex(info.crypt_count)),)
        if bin(info.crypt_count).count("1") % 2 == 0:
            out.append(Verdict(REQ_FLASH_ENCRYPTION, "flash-encryption", Outcome.FAIL,
                               "flash encryption is off (an even count)", ev,
                               "build with flash encryption in release mode and flash it"))
        else:
            out.append(Verdict(REQ_FLASH_ENCRYPTION, "flash-encryption", Outcome.UNDECIDED,
                               "flash encryption is on; security info does not tell whether "
                               "the counter is write-protected (release mode)", ev,
                               fix_summary))
    has_flash_key = any(p in FLASH_KEY_PURPOSES for p in info.key_purposes)
    out.append(Verdict(REQ_FLASH_KEY_HIDDEN, "flash-key-hidden",
                       Outcome.UNDECIDED if has_flash_key or not info.key_purposes
                       else Outcome.FAIL,
                       "security info does not report read protection" if has_flash_key
                       or not info.key_purposes
                       else "no key block holds a flash encryption key", (), fix_summary))
    ev = (_flag(info, "HARD_DIS_JTAG", FLAG_HARD_DIS_JTAG),
          _flag(info, "SOFT_DIS_JTAG", FLAG_SOFT_DIS_JTAG))
    usb_jtag = CHIP_IDS.get(info.chip_id or -1, ("", True))[1]
    if not flags & FLAG_HARD_DIS_JTAG:
        out.append(Verdict(REQ_JTAG_OFF, "jtag-off", Outcome.FAIL,
                           "JTAG pins are not permanently off", ev,
                           "burn DIS_PAD_JTAG (HARD_DIS_JTAG on the ESP32-S2) before Secure "
                           "Download Mode, or from the firmware"))
    elif usb_jtag:
        out.append(Verdict(REQ_JTAG_OFF, "jtag-off", Outcome.UNDECIDED,
                           "JTAG pins are off; security info does not report USB-JTAG", ev,
                           fix_summary))
    else:
        out.append(Verdict(REQ_JTAG_OFF, "jtag-off", Outcome.PASS, "JTAG is permanently off",
                           ev))
    ev = (_flag(info, "SECURE_DOWNLOAD_ENABLE", FLAG_SECURE_DOWNLOAD_ENABLE),)
    sdm = bool(flags & FLAG_SECURE_DOWNLOAD_ENABLE)
    out.append(Verdict(REQ_DOWNLOAD_MODE, "download-mode",
                       Outcome.PASS if sdm else Outcome.FAIL,
                       "ROM download mode is restricted to Secure Download Mode" if sdm
                       else "ROM download mode is open", ev,
                       "" if sdm else "`espefuse --port PORT burn-efuse "
                       "ENABLE_SECURITY_DOWNLOAD 1`"))
    out.append(Verdict(REQ_CONFIG_LOCKED, "config-locked", Outcome.UNDECIDED,
                       "security info does not report which eFuses are write-protected", (),
                       fix_summary))
    return out
