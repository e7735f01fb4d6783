"""A chip in Secure Download Mode: the summary is refused, get-security-info decides what it can.

No virtual chip answers GET_SECURITY_INFO, so the tool's output is written here in the exact
form esptool 5.6 prints it (``esptool/cmds.py::get_security_info``), and the collector's
child processes are replaced by a runner that answers as the real tools do.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from cityedge_hardware.efuse_collect import Runner, collect
from cityedge_hardware.errors import CollectError, EfuseDataError
from cityedge_hardware.secinfo import check_security_info, parse_security_info
from cityedge_hardware.verdict import Outcome


def secinfo_text(flags: int, purposes: Sequence[int], crypt: int, chip_id: int = 9) -> str:
    """esptool 5.6's get-security-info output for an ESP32-S3-like chip."""
    names = {0: "USER", 4: "XTS_AES_128_KEY", 9: "SECURE_BOOT_DIGEST0"}
    lines = ["Security Information:", "=====================",
             f"Flags: {flags:#010x} ({bin(flags)})",
             "Key Purposes: %s" % (list(purposes),),
             "  " + "\n  ".join("BLOCK_KEY%d - %s" % (n, names.get(p, "UNKNOWN"))
                                for n, p in enumerate(purposes)),
             "Chip ID: %d" % chip_id, "API Version: 2",
             "Secure Boot: %s" % ("Enabled" if flags & 1 else "Disabled"),
             "Flash Encryption: %s" % ("Enabled" if bin(crypt).count("1") % 2 else "Disabled"),
             "SPI Boot Crypt Count (SPI_BOOT_CRYPT_CNT): %#x" % crypt]
    return "\n".join(lines) + "\n"


# secure boot, secure download, revoke 1 and 2, hard JTAG disable
HARDENED_FLAGS = (1 << 0) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 7)
HARDENED = secinfo_text(HARDENED_FLAGS, [4, 9, 0, 0, 0, 0], 0x1)


def _outcomes(text: str) -> dict[str, Outcome]:
    return {v.check: v.outcome for v in check_security_info(parse_security_info(text))}


def test_a_hardened_chip_in_secure_download_mode() -> None:
    assert _outcomes(HARDENED) == {
        "secure-boot": Outcome.PASS,
        "secure-boot-keys": Outcome.PASS,
        "flash-encryption": Outcome.UNDECIDED,  # release mode is not reported
        "flash-key-hidden": Outcome.UNDECIDED,  # read protection is not reported
        "jtag-off": Outcome.UNDECIDED,  # the S3's USB-JTAG is not reported
        "download-mode": Outcome.PASS,
        "config-locked": Outcome.UNDECIDED,  # write protection is not reported
    }


def test_a_revoked_only_digest_and_open_pins_fail() -> None:
    flags = HARDENED_FLAGS | (1 << 3)  # slot 0, the one in use, revoked
    flags &= ~(1 << 7)  # JTAG pins not hard-disabled
    out = _outcomes(secinfo_text(flags, [4, 9, 0, 0, 0, 0], 0x3))
    assert out["secure-boot-keys"] is Outcome.FAIL
    assert out["jtag-off"] is Outcome.FAIL
    assert out["flash-encryption"] is Outcome.FAIL  # 0x3: two bits, off


def test_a_chip_without_usb_jtag_passes_on_the_hard_disable_flag() -> None:
    out = _outcomes(secinfo_text(HARDENED_FLAGS, [4, 9, 0, 0, 0, 0], 0x1, chip_id=2))
    assert out["jtag-off"] is Outcome.PASS


def test_output_without_flags_is_refused() -> None:
    with pytest.raises(EfuseDataError, match="Flags"):
        parse_security_info("Chip is ESP32-D0WD-V3\n")


def _runner(summary_rc: int, summary_out: str, secinfo_rc: int = 0,
            secinfo_out: str = HARDENED) -> tuple[list[list[str]], Runner]:
    calls: list[list[str]] = []

    def run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        assert timeout_s > 0
        if "espefuse" in argv:
            return subprocess.CompletedProcess(list(argv), summary_rc, summary_out, "")
        return subprocess.CompletedProcess(list(argv), secinfo_rc, secinfo_out, "")
    return calls, run


def test_the_collector_falls_back_to_security_info_in_secure_download_mode() -> None:
    calls, run = _runner(2, "A fatal error occurred: Secure Download Mode is enabled. "
                         "The tool can not read eFuses.")
    result = collect("/dev/ttyUSB0", runner=run)
    assert result.source == "security-info"
    assert result.chip == "esp32s3"
    assert [c[2] for c in calls] == ["espefuse", "esptool"]
    assert calls[1][-1] == "get-security-info"


def test_the_collector_reports_a_failing_tool_with_its_last_words() -> None:
    _, run = _runner(2, "A fatal error occurred: Could not open /dev/ttyUSB9, the port "
                     "is busy or doesn't exist.")
    with pytest.raises(CollectError, match="Could not open /dev/ttyUSB9"):
        collect("/dev/ttyUSB9", runner=run)


def test_the_collector_turns_a_hung_tool_into_a_user_error() -> None:
    def run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(list(argv), timeout_s)
    with pytest.raises(CollectError, match="did not finish"):
        collect("/dev/ttyUSB0", runner=run)
