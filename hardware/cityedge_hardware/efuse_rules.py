"""The eFuse rules: a parsed ``espefuse summary`` in, one verdict per catalogue requirement out.

Sans-IO: ``check_summary(summary)`` reads nothing but its argument (``efuse_collect`` runs the
tools). Each rule decides on raw values (``efuse_summary``: never on the display ``value``, a
read-protected field is ``raw=None``, not zero) through the chip's table (``efuse_chips``),
and returns pass, fail or "could not decide" with the fields it read and the command that
fixes a failure. A field the rule needs that is absent or hidden is "could not decide", never
a pass. The rules, in the order they are reported:

1. ``secure-boot`` (CE-BOOT-01): secure boot v2 is on (``ABS_DONE_1`` on the ESP32 — v1,
   ``ABS_DONE_0``, alone fails, and so does v2 on an ESP32 older than revision 3, whose ROM
   ignores it —, ``SECURE_BOOT_EN`` elsewhere).
2. ``secure-boot-keys`` (CE-BOOT-02): at least one key digest is burned, non-empty and not
   revoked, and every digest slot without a digest is revoked (else whoever holds the board
   can burn a digest of their own key there). The ESP32 has one digest (``BLOCK2``) and no
   revocation.
3. ``flash-encryption`` (CE-DATA-01): the counter has an odd number of bits set (on) and is
   write-protected (release mode: it cannot be switched off again).
4. ``flash-key-hidden`` (CE-DATA-02): a flash encryption key is burned (``KEY_PURPOSE_n`` is an
   XTS-AES purpose, both halves for AES-256) and every such block is read-protected
   (``RD_DIS`` bit ``n``; ``RD_DIS`` bit 0 for the ESP32's ``BLOCK1``).
5. ``jtag-off`` (CE-DBG-01): every JTAG path is permanently off (pads and USB; a soft disable
   that an HMAC key can undo does not count).
6. ``download-mode`` (CE-DBG-02): ROM download mode is off, or restricted to Secure Download
   Mode (no eFuse or memory reads). The ESP32 has no such mode: it must be off, which works
   from revision 3 on.
7. ``config-locked`` (CE-BOOT-03): the security configuration cannot be changed in the field.
   eFuse bits only go from 0 to 1, so a burned field can still change while it has a 0 bit
   left and its write-protect bit (``WR_DIS``, the capture's ``writeable``) is clear: every
   field of rules 1-6 in its secure state (the switches, revoked digest slots, an odd crypt
   counter: one more bit turns encryption off) and the purpose and contents of every key
   block in use (a writeable purpose can turn a flash key into an HMAC key that re-enables
   JTAG; a writeable digest or key block can be burned further) must be write-protected or
   have every bit burned. A chip with nothing burned fails (there is nothing locked); a
   capture without the ``writeable`` flags cannot decide. A digest slot that is still live
   keeps its revoke bit writeable on purpose: revoking is how a key is retired in the field.

The fixes name ``espefuse`` commands; burning eFuses cannot be undone, so each fix is what to
run after the firmware is ready for it (the vendor guide, ``docs/VENDOR_GUIDE.md``, says in
which order).
"""

from __future__ import annotations

from collections.abc import Callable

from cityedge_hardware.efuse_chips import (
    CHIPS,
    FLASH_KEY_PURPOSES,
    PURPOSE_NAMES,
    PURPOSE_SECURE_BOOT_DIGEST,
    PURPOSE_XTS_AES_256_KEY_1,
    PURPOSE_XTS_AES_256_KEY_2,
    ChipFuses,
    Switch,
    identify,
)
from cityedge_hardware.efuse_summary import EfuseSummary, Fuse
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

REQ_SECURE_BOOT = "CE-BOOT-01"
REQ_SECURE_BOOT_KEYS = "CE-BOOT-02"
REQ_FLASH_ENCRYPTION = "CE-DATA-01"
REQ_FLASH_KEY_HIDDEN = "CE-DATA-02"
REQ_JTAG_OFF = "CE-DBG-01"
REQ_DOWNLOAD_MODE = "CE-DBG-02"
REQ_CONFIG_LOCKED = "CE-BOOT-03"

EFUSE_REQUIREMENTS = (REQ_SECURE_BOOT, REQ_SECURE_BOOT_KEYS, REQ_FLASH_ENCRYPTION,
                      REQ_FLASH_KEY_HIDDEN, REQ_JTAG_OFF, REQ_DOWNLOAD_MODE, REQ_CONFIG_LOCKED)

_ESPEFUSE = "espefuse --port PORT"


def _ev(f: Fuse, note: str = "") -> Evidence:
    return Evidence(f.name, f.shown, note)


def _missing(req: str, check: str, names: list[str]) -> Verdict:
    return Verdict(req, check, Outcome.UNDECIDED,
                   "the capture lacks %s" % ", ".join(names),
                   fix="capture the summary again with the esptool version cityedge installs")


def _hidden(req: str, check: str, f: Fuse) -> Verdict:
    return Verdict(req, check, Outcome.UNDECIDED,
                   "%s is read-protected, so its value cannot be seen" % f.name, (_ev(f),))


def _odd(n: int) -> bool:
    return bin(n).count("1") % 2 == 1


def _every_bit_burned(f: Fuse) -> bool:
    """No bit is left to burn: the field can never change again, write-protected or not."""
    return f.raw is not None and f.raw == (1 << f.bit_len) - 1


def _lock_state(f: Fuse) -> str:
    if _every_bit_burned(f):
        return "every bit burned"
    if f.writeable is None:
        return "write protection not in the capture"
    return "still writeable" if f.writeable else "write-protected"


_NO_FLAGS_FIX = ("capture the summary again with `espefuse summary --format json` (its "
                 "`writeable` flags say what is write-protected)")


class _Reader:
    """Field lookups that remember what was missing or hidden, for a rule's verdict."""

    def __init__(self, summary: EfuseSummary) -> None:
        self.summary = summary
        self.missing: list[str] = []
        self.hidden: Fuse | None = None

    def fuse(self, name: str) -> Fuse | None:
        f = self.summary.get(name)
        if f is None:
            self.missing.append(name)
        elif f.raw is None and self.hidden is None:
            self.hidden = f
        return f

    def raw(self, name: str) -> int | None:
        f = self.fuse(name)
        return None if f is None else f.raw

    def undecided(self, req: str, check: str) -> Verdict | None:
        if self.missing:
            return _missing(req, check, self.missing)
        if self.hidden is not None:
            return _hidden(req, check, self.hidden)
        return None


def _switches(summary: EfuseSummary, req: str, check: str, switches: tuple[Switch, ...]
              ) -> tuple[Verdict | None, list[Fuse], list[Switch]]:
    """Read switches: (undecided verdict or None, the fuses read, the ones not secure)."""
    rd = _Reader(summary)
    fuses = [rd.fuse(s.field) for s in switches]
    bad = rd.undecided(req, check)
    if bad is not None:
        return bad, [], []
    found = [f for f in fuses if f is not None]
    off = [s for s, f in zip(switches, found, strict=True) if f.raw != s.secure]
    return None, found, off


ESP32_REVISION_FIELD = "WAFER_VERSION_MAJOR"  # espefuse computes it from eFuses and a register
ESP32_V3 = 3  # secure boot v2 and UART_DOWNLOAD_DIS work from ESP32 revision 3 on


def _old_esp32(summary: EfuseSummary, req: str, check: str, switch: Fuse
               ) -> Verdict | None:
    """On the ESP32 a v3-only switch that is burned on an older chip does nothing: fail."""
    rev = summary.get(ESP32_REVISION_FIELD)
    if rev is None or rev.raw is None:
        return Verdict(req, check, Outcome.UNDECIDED,
                       "%s is burned but the chip revision (%s) is not in the capture"
                       % (switch.name, ESP32_REVISION_FIELD), (_ev(switch),))
    if rev.raw < ESP32_V3:
        return Verdict(req, check, Outcome.FAIL,
                       "%s is burned, but this ESP32 is revision %d: the ROM ignores it "
                       "before revision 3" % (switch.name, rev.raw), (_ev(switch), _ev(rev)),
                       "use ESP32 revision 3 (ECO3) or later for city devices")
    return None


# 1 ---------------------------------------------------------------------------------------
def rule_secure_boot(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "secure-boot"
    bad, fuses, off = _switches(summary, REQ_SECURE_BOOT, check, (chip.secure_boot,))
    if bad is not None:
        return bad
    ev = tuple(_ev(f) for f in fuses)
    if not off and chip.layout == "classic":
        too_old = _old_esp32(summary, REQ_SECURE_BOOT, check, fuses[0])
        if too_old is not None:
            return too_old
    if not off:
        return Verdict(REQ_SECURE_BOOT, check, Outcome.PASS, chip.secure_boot.meaning, ev)
    if chip.layout == "classic":
        v1 = summary.get("ABS_DONE_0")
        fix = ("build the bootloader with secure boot v2 (ESP32 revision 3 or later) and flash "
               "it, or burn the key digest and the enable bit: `%s burn-key-digest "
               "signing_pub.pem`, then `%s burn-efuse ABS_DONE_1 1`" % (_ESPEFUSE, _ESPEFUSE))
        if v1 is not None and v1.raw == 1:
            return Verdict(REQ_SECURE_BOOT, check, Outcome.FAIL,
                           "only secure boot v1 is on (a symmetric key in the chip; the city "
                           "requires v2's public-key signatures)", (*ev, _ev(v1)), fix)
        return Verdict(REQ_SECURE_BOOT, check, Outcome.FAIL, "secure boot is off", ev, fix)
    return Verdict(REQ_SECURE_BOOT, check, Outcome.FAIL, "secure boot is off", ev,
                   "build the bootloader with secure boot v2 and flash it, or burn a key "
                   "digest and the enable bit: `%s burn-key-digest BLOCK_KEY0 signing_pub.pem "
                   "SECURE_BOOT_DIGEST0`, then `%s burn-efuse SECURE_BOOT_EN 1`"
                   % (_ESPEFUSE, _ESPEFUSE))


# 2 ---------------------------------------------------------------------------------------
def rule_secure_boot_keys(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "secure-boot-keys"
    req = REQ_SECURE_BOOT_KEYS
    if chip.layout == "single-key":
        return Verdict(req, check, Outcome.UNDECIDED,
                       "%s keeps the flash key and the secure boot digest in one block; "
                       "this checker does not read that layout yet" % chip.chip,
                       fix="declare the key layout as evidence")
    if chip.layout == "classic":
        rd = _Reader(summary)
        block2 = rd.fuse("BLOCK2")
        bad = rd.undecided(req, check)
        if bad is not None or block2 is None:
            return bad or _missing(req, check, ["BLOCK2"])
        if block2.raw == 0:
            return Verdict(req, check, Outcome.FAIL, "no secure boot key digest in BLOCK2",
                           (_ev(block2),),
                           "`%s burn-key-digest signing_pub.pem` (the public half of the "
                           "release signing key)" % _ESPEFUSE)
        return Verdict(req, check, Outcome.PASS,
                       "a key digest is in BLOCK2 (the ESP32 has one digest and no revocation)",
                       (_ev(block2),))
    rd = _Reader(summary)
    purposes = [rd.fuse("KEY_PURPOSE_%d" % n) for n in range(chip.key_blocks)]
    revokes = [rd.fuse(name) for name in chip.revoke_fields]
    bad = rd.undecided(req, check)
    if bad is not None:
        return bad
    evidence: list[Evidence] = []
    live: list[int] = []
    problems: list[str] = []
    fixes: list[str] = []
    used_slots: set[int] = set()
    for n, purpose in enumerate(purposes):
        assert purpose is not None and purpose.raw is not None  # checked by undecided()
        if purpose.raw not in PURPOSE_SECURE_BOOT_DIGEST:
            continue
        slot = PURPOSE_SECURE_BOOT_DIGEST.index(purpose.raw)
        used_slots.add(slot)
        block = summary.get("BLOCK_KEY%d" % n)
        revoke = revokes[slot]
        assert revoke is not None
        evidence += [_ev(purpose, PURPOSE_NAMES[purpose.raw]), _ev(revoke)]
        if block is not None:
            evidence.append(_ev(block))
        if revoke.raw == 1:
            problems.append("digest %d (BLOCK_KEY%d) is revoked" % (slot, n))
        elif block is None or block.raw is None:
            problems.append("digest %d (BLOCK_KEY%d) cannot be read" % (slot, n))
        elif block.raw == 0:
            problems.append("digest %d (BLOCK_KEY%d) is empty" % (slot, n))
        else:
            live.append(slot)
    for slot, revoke in enumerate(revokes):
        assert revoke is not None
        if slot not in used_slots and revoke.raw != 1:
            evidence.append(_ev(revoke, "no digest in slot %d" % slot))
            problems.append("slot %d has no digest and is not revoked" % slot)
            fixes.append("`%s burn-efuse %s 1`" % (_ESPEFUSE, revoke.name))
    ev = tuple(evidence)
    if not used_slots:
        return Verdict(req, check, Outcome.FAIL, "no key block holds a secure boot digest", ev,
                       "`%s burn-key-digest BLOCK_KEYn signing_pub.pem SECURE_BOOT_DIGEST0` "
                       "(a free key block)" % _ESPEFUSE)
    if not live:
        return Verdict(req, check, Outcome.FAIL,
                       "no usable secure boot digest: %s" % "; ".join(problems), ev,
                       "burn the digest of a key that is not revoked into a free slot: "
                       "`%s burn-key-digest BLOCK_KEYn signing_pub.pem SECURE_BOOT_DIGESTk`"
                       % _ESPEFUSE)
    if fixes:
        return Verdict(req, check, Outcome.FAIL, "; ".join(problems), ev, "; ".join(fixes))
    return Verdict(req, check, Outcome.PASS,
                   "digest slot(s) %s in use%s" % (", ".join(str(s) for s in live),
                                                   "; " + "; ".join(problems) if problems
                                                   else "; unused slots revoked"), ev)


# 3 ---------------------------------------------------------------------------------------
def rule_flash_encryption(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "flash-encryption"
    req = REQ_FLASH_ENCRYPTION
    if chip.crypt_counter is None:
        return Verdict(req, check, Outcome.UNDECIDED,
                       "esptool's table for %s has no flash encryption counter" % chip.chip,
                       fix="declare how flash contents are encrypted as evidence")
    rd = _Reader(summary)
    cnt = rd.fuse(chip.crypt_counter)
    bad = rd.undecided(req, check)
    if bad is not None or cnt is None or cnt.raw is None:
        return bad or _missing(req, check, [chip.crypt_counter])
    ev = (_ev(cnt, "%d bit(s) set, %s" % (bin(cnt.raw).count("1"), _lock_state(cnt))),)
    if not _odd(cnt.raw):
        return Verdict(req, check, Outcome.FAIL, "flash encryption is off (an even count)", ev,
                       "build with flash encryption in release mode and flash it; the "
                       "bootloader encrypts the flash and burns %s on first boot"
                       % chip.crypt_counter)
    if cnt.writeable is None and not _every_bit_burned(cnt):
        return Verdict(req, check, Outcome.UNDECIDED,
                       "flash encryption is on, but the capture does not say whether %s is "
                       "write-protected (release mode)" % cnt.name, ev, _NO_FLAGS_FIX)
    if cnt.writeable and not _every_bit_burned(cnt):
        return Verdict(req, check, Outcome.FAIL,
                       "flash encryption is on in development mode: the counter is not "
                       "write-protected, so encryption can be switched off again", ev,
                       "`%s write-protect-efuse %s` (or build in release mode)"
                       % (_ESPEFUSE, chip.crypt_counter))
    return Verdict(req, check, Outcome.PASS, "flash encryption is on in release mode", ev)


# 4 ---------------------------------------------------------------------------------------
def rule_flash_key_hidden(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "flash-key-hidden"
    req = REQ_FLASH_KEY_HIDDEN
    if chip.layout == "single-key":
        return Verdict(req, check, Outcome.UNDECIDED,
                       "%s keeps the flash key and the secure boot digest in one block; "
                       "this checker does not read that layout yet" % chip.chip,
                       fix="declare the key layout as evidence")
    rd = _Reader(summary)
    rd_dis = rd.fuse("RD_DIS")
    if chip.layout == "classic":
        block1 = summary.get("BLOCK1")  # hidden is what it should be: not an undecided
        bad = rd.undecided(req, check)
        if bad is not None or rd_dis is None or block1 is None or rd_dis.raw is None:
            return bad or _missing(req, check, ["RD_DIS", "BLOCK1"])
        ev = (_ev(rd_dis, "bit 0 protects BLOCK1"), _ev(block1))
        if rd_dis.raw & 1:
            return Verdict(req, check, Outcome.PASS,
                           "BLOCK1 (the flash encryption key) is read-protected", ev)
        if block1.raw == 0:
            return Verdict(req, check, Outcome.FAIL, "no flash encryption key in BLOCK1", ev,
                           "let the bootloader generate it (flash encryption in release "
                           "mode), or `%s burn-key flash_encryption key.bin`" % _ESPEFUSE)
        return Verdict(req, check, Outcome.FAIL,
                       "the flash encryption key in BLOCK1 can be read by software", ev,
                       "`%s read-protect-efuse BLOCK1`" % _ESPEFUSE)
    purposes = [rd.fuse("KEY_PURPOSE_%d" % n) for n in range(chip.key_blocks)]
    bad = rd.undecided(req, check)
    if bad is not None or rd_dis is None or rd_dis.raw is None:
        return bad or _missing(req, check, ["RD_DIS"])
    keys = [(n, p.raw) for n, p in enumerate(purposes)
            if p is not None and p.raw in FLASH_KEY_PURPOSES]
    evidence = [_ev(rd_dis, "bit n protects BLOCK_KEYn")]
    evidence += [Evidence("KEY_PURPOSE_%d" % n, hex(raw), PURPOSE_NAMES[raw])
                 for n, raw in keys]
    if not keys:
        return Verdict(req, check, Outcome.FAIL, "no key block holds a flash encryption key",
                       tuple(evidence),
                       "let the bootloader generate it (flash encryption in release mode), "
                       "or `%s burn-key BLOCK_KEYn key.bin XTS_AES_128_KEY`" % _ESPEFUSE)
    halves = {raw for _, raw in keys}
    if (PURPOSE_XTS_AES_256_KEY_1 in halves) != (PURPOSE_XTS_AES_256_KEY_2 in halves):
        return Verdict(req, check, Outcome.FAIL,
                       "only one half of an XTS-AES-256 key is burned", tuple(evidence),
                       "burn the other half: `%s burn-key BLOCK_KEYn key.bin "
                       "XTS_AES_256_KEY`" % _ESPEFUSE)
    readable = [n for n, _ in keys if not (rd_dis.raw >> n) & 1]
    if readable:
        return Verdict(req, check, Outcome.FAIL,
                       "flash key block(s) %s can be read by software"
                       % ", ".join("BLOCK_KEY%d" % n for n in readable), tuple(evidence),
                       "; ".join("`%s read-protect-efuse BLOCK_KEY%d`" % (_ESPEFUSE, n)
                                 for n in readable))
    return Verdict(req, check, Outcome.PASS,
                   "flash key block(s) %s are read-protected"
                   % ", ".join("BLOCK_KEY%d" % n for n, _ in keys), tuple(evidence))


# 5 ---------------------------------------------------------------------------------------
def rule_jtag_off(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "jtag-off"
    bad, fuses, off = _switches(summary, REQ_JTAG_OFF, check, chip.jtag_off)
    if bad is not None:
        return bad
    ev = tuple(_ev(f) for f in fuses)
    if not off:
        return Verdict(REQ_JTAG_OFF, check, Outcome.PASS,
                       "; ".join(s.meaning for s in chip.jtag_off), ev)
    soft = summary.get("SOFT_DIS_JTAG")
    reason = "JTAG is not permanently off (%s)" % ", ".join("%s is not %d" % (s.field, s.secure)
                                                            for s in off)
    if soft is not None and soft.raw is not None and _odd(soft.raw):
        reason += "; SOFT_DIS_JTAG only blocks it until an HMAC key re-enables it"
        ev = (*ev, _ev(soft))
    return Verdict(REQ_JTAG_OFF, check, Outcome.FAIL, reason, ev,
                   "`%s burn-efuse %s`" % (_ESPEFUSE, " ".join("%s %d" % (s.field, s.secure)
                                                              for s in off)))


# 6 ---------------------------------------------------------------------------------------
def rule_download_mode(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "download-mode"
    switches = (chip.download_off,) + ((chip.secure_download,) if chip.secure_download else ())
    bad, fuses, off = _switches(summary, REQ_DOWNLOAD_MODE, check, switches)
    if bad is not None:
        return bad
    ev = tuple(_ev(f) for f in fuses)
    on = [s for s in switches if s not in off]
    if on and chip.layout == "classic":
        too_old = _old_esp32(summary, REQ_DOWNLOAD_MODE, check, fuses[0])
        if too_old is not None:
            return too_old
    if on:
        return Verdict(REQ_DOWNLOAD_MODE, check, Outcome.PASS, on[0].meaning, ev)
    if chip.secure_download is None:
        return Verdict(REQ_DOWNLOAD_MODE, check, Outcome.FAIL,
                       "ROM download mode is open: anyone with the board can read eFuses and "
                       "flash", ev,
                       "`%s burn-efuse %s 1` (ESP32 revision 3 or later; capture this summary "
                       "first, the checker cannot read the chip afterwards)"
                       % (_ESPEFUSE, chip.download_off.field))
    return Verdict(REQ_DOWNLOAD_MODE, check, Outcome.FAIL,
                   "ROM download mode is open: anyone with the board can read eFuses and memory",
                   ev, "`%s burn-efuse %s 1` (Secure Download Mode: flashing still works), or "
                   "`%s 1` to turn it off" % (_ESPEFUSE, chip.secure_download.field,
                                             chip.download_off.field))


# 7 ---------------------------------------------------------------------------------------
def _burned_settings(summary: EfuseSummary, chip: ChipFuses, rd: _Reader
                     ) -> list[tuple[Fuse, str]]:
    """The security fields in their secure state, each with what it holds: switches at
    their secure value, revoked digest slots, an odd crypt counter, the purpose and the
    contents of every key block in use (a purpose other than USER; on the ESP32 ``BLOCK1``
    and ``BLOCK2`` when burned or hidden).

    Reads through ``rd``, so a missing or hidden switch, counter or key purpose is noted
    there; a key block is read directly (a hidden flash key is what it should be)."""
    switches = (chip.secure_boot, *chip.jtag_off, chip.download_off,
                *((chip.secure_download,) if chip.secure_download else ()))
    read = [(rd.fuse(s.field), s.secure, s.meaning) for s in switches]
    read += [(rd.fuse(name), 1, "digest slot %d is revoked" % n)
             for n, name in enumerate(chip.revoke_fields)]
    burned = [(f, what) for f, secure, what in read if f is not None and f.raw == secure]
    if chip.crypt_counter is not None:
        cnt = rd.fuse(chip.crypt_counter)
        if cnt is not None and cnt.raw is not None and _odd(cnt.raw):
            burned.append((cnt, "flash encryption is on"))
    blocks: list[tuple[str, str]] = []  # (key block, what it holds) in use
    if chip.layout == "key-purpose":
        for n in range(chip.key_blocks):
            purpose = rd.fuse("KEY_PURPOSE_%d" % n)
            if purpose is not None and purpose.raw:
                name = PURPOSE_NAMES.get(purpose.raw, "purpose %d" % purpose.raw)
                burned.append((purpose, "the purpose of BLOCK_KEY%d (%s)" % (n, name)))
                blocks.append(("BLOCK_KEY%d" % n, name))
    elif chip.layout == "classic":
        blocks = [("BLOCK1", "the flash encryption key"), ("BLOCK2", "the secure boot digest")]
    for name, what in blocks:
        block = summary.get(name)
        if block is None:
            rd.missing.append(name)
        elif chip.layout == "key-purpose" or block.raw != 0:  # None (hidden) is in use
            burned.append((block, what))
    return burned


def rule_config_locked(summary: EfuseSummary, chip: ChipFuses) -> Verdict:
    check = "config-locked"
    req = REQ_CONFIG_LOCKED
    rd = _Reader(summary)
    burned = _burned_settings(summary, chip, rd)
    bad = rd.undecided(req, check)
    if bad is not None:
        return bad
    ev = tuple(_ev(f, "%s; %s" % (what, _lock_state(f))) for f, what in burned)
    if not burned:
        return Verdict(req, check, Outcome.FAIL,
                       "no security setting is burned yet, so nothing is locked: whoever "
                       "holds the board can burn them, with keys of their own", ev,
                       "burn what the other eFuse rows ask for, then write-protect it "
                       "(docs/VENDOR_GUIDE.md gives the order)")
    movable = [f for f, _ in burned if not _every_bit_burned(f)]
    open_ = [f for f in movable if f.writeable]
    if open_:
        names = " ".join(f.name for f in open_)
        return Verdict(req, check, Outcome.FAIL,
                       "burned security fields can still be changed (not write-protected): "
                       "%s" % ", ".join(f.name for f in open_), ev,
                       "`%s write-protect-efuse %s` while espefuse can still reach the chip "
                       "(before download mode is restricted); one write-protect bit covers a "
                       "group of fields, which espefuse lists: burn what the group still "
                       "needs first" % (_ESPEFUSE, names))
    unknown = [f for f in movable if f.writeable is None]
    if unknown:
        return Verdict(req, check, Outcome.UNDECIDED,
                       "the capture does not say whether %s are write-protected"
                       % ", ".join(f.name for f in unknown), ev, _NO_FLAGS_FIX)
    if chip.layout == "single-key":
        return Verdict(req, check, Outcome.UNDECIDED,
                       "the burned switches cannot change, but %s keeps the flash key and "
                       "the secure boot digest in one block, which this checker does not "
                       "read yet" % chip.chip, ev, "declare the key layout as evidence")
    return Verdict(req, check, Outcome.PASS,
                   "the %d burned security fields cannot change: %d write-protected, %d "
                   "with every bit burned" % (len(burned), len(movable),
                                              len(burned) - len(movable)), ev)


RULES: tuple[Callable[[EfuseSummary, ChipFuses], Verdict], ...] = (
    rule_secure_boot, rule_secure_boot_keys, rule_flash_encryption, rule_flash_key_hidden,
    rule_jtag_off, rule_download_mode, rule_config_locked)


def check_summary(summary: EfuseSummary, chip: str | None = None
                  ) -> tuple[str | None, list[Verdict]]:
    """Run every rule: (the chip the capture was read as, the verdicts in rule order).

    ``chip`` names the table to use (``efuse_chips.CHIPS``); by default the capture's fields
    pick it. A capture that fits no table gets "could not decide" for every requirement.
    """
    table = CHIPS.get(chip) if chip else identify(frozenset(summary.fuses))
    if table is None:
        what = ("unknown chip %r (known: %s)" % (chip, ", ".join(CHIPS)) if chip
                else "the capture's fields match no chip esptool 5.6 knows")
        return None, [Verdict(req, "chip", Outcome.UNDECIDED, what,
                              fix="capture the summary with the esptool version cityedge "
                              "installs, or pass the chip name")
                      for req in EFUSE_REQUIREMENTS]
    return table.chip, [rule(summary, table) for rule in RULES]
