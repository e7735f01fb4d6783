"""eFuse captures made by esptool's own virtual chips (the session fixtures are in
``tests/hardware/conftest.py``).

``espefuse --virt`` emulates each chip's eFuse controller, including the checks it makes
before a burn (the chip revision secure boot v2 needs, key purposes, read protection), so a
capture made this way is what the real chip would report. For each chip the tests cover
there is a blank capture (factory state), a burned one (every fuse the rules read burned
the way a release would burn them, but key blocks and the crypt counter still writeable)
and a hardened one (the same chip after ``lock`` write-protected those); the other chips
esptool knows get a blank one, for chip recognition. Generated into a session temporary
directory, two at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the chips the rules are tested both ways on, and the rest esptool 5.6 knows
HARDENED_CHIPS = ("esp32", "esp32s2", "esp32s3", "esp32c3", "esp32c6", "esp32h2")
OTHER_CHIPS = ("esp32c2", "esp32c5", "esp32c61", "esp32h21", "esp32h4", "esp32p4",
               "esp32s31", "esp32e22")


def espefuse(chip: str, efuse_file: Path, *args: str) -> str:
    """Run espefuse on the virtual chip whose eFuses live in ``efuse_file``."""
    argv = [sys.executable, "-m", "espefuse", "--virt", "--path-efuse-file", str(efuse_file),
            "--chip", chip, "--do-not-confirm", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, "espefuse %s failed:\n%s%s" % (" ".join(args), done.stdout,
                                                                done.stderr)
    return done.stdout


def summary(chip: str, efuse_file: Path, out: Path) -> Path:
    espefuse(chip, efuse_file, "summary", "--format", "json", "--file", str(out))
    return out


def burn(chip: str, efuse_file: Path, keys: Path) -> None:
    """Burn what a release burns, but leave the key blocks and the crypt counter writeable:
    secure boot v2 with one digest and the other slots revoked, flash encryption with a
    hidden key, JTAG off, download mode restricted. (espefuse write-protects a key purpose
    whatever it is told; ``--no-write-protect`` / ``--no-protect-key`` leave the block.)"""
    flash_key, signing = keys / "flash_key.bin", keys / "signing.pem"
    if chip == "esp32":
        # secure boot v2 needs chip revision 3: the revision bits are eFuses too
        espefuse(chip, efuse_file, "burn-efuse", "CHIP_VER_REV1", "1", "CHIP_VER_REV2", "1")
        espefuse(chip, efuse_file, "burn-key", "flash_encryption", str(flash_key),
                 "burn-key-digest", str(signing), "--no-protect-key",
                 "burn-efuse", "ABS_DONE_1", "1", "FLASH_CRYPT_CNT", "1", "JTAG_DISABLE", "1",
                 "UART_DOWNLOAD_DIS", "1")
        return
    jtag = ["HARD_DIS_JTAG", "1"] if chip == "esp32s2" else ["DIS_PAD_JTAG", "1",
                                                            "DIS_USB_JTAG", "1"]
    espefuse(chip, efuse_file, "burn-key", "BLOCK_KEY0", str(flash_key), "XTS_AES_128_KEY",
             "--no-write-protect",
             "burn-key-digest", "BLOCK_KEY1", str(signing), "SECURE_BOOT_DIGEST0",
             "--no-write-protect",
             "burn-efuse", "SECURE_BOOT_EN", "1", "SPI_BOOT_CRYPT_CNT", "1", *jtag,
             "ENABLE_SECURITY_DOWNLOAD", "1", "SECURE_BOOT_KEY_REVOKE1", "1",
             "SECURE_BOOT_KEY_REVOKE2", "1")


# what ``lock`` write-protects: the fields ``burn`` left writeable that could still change
LOCKED = {"esp32": ("FLASH_CRYPT_CNT", "BLOCK2")}
LOCKED_DEFAULT = ("SPI_BOOT_CRYPT_CNT", "BLOCK_KEY0", "BLOCK_KEY1")


def lock(chip: str, efuse_file: Path) -> None:
    """Write-protect what ``burn`` left writeable (release mode: the counter is locked)."""
    espefuse(chip, efuse_file, "write-protect-efuse", *LOCKED.get(chip, LOCKED_DEFAULT))


@dataclass(frozen=True)
class Captures:
    blank: dict[str, Path]
    burned: dict[str, Path]  # burned, not yet write-protected
    hardened: dict[str, Path]  # burned and write-protected
    efuse_files: dict[str, Path]  # the hardened virtual chips' eFuse memory

    def path(self, kind: str, chip: str) -> Path:
        return {"blank": self.blank, "burned": self.burned, "hardened": self.hardened}[kind][chip]

    def load(self, kind: str, chip: str) -> dict[str, Any]:
        path = self.path(kind, chip)
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
