"""A real PKCS#11 token for the CA custody tests: SoftHSM2 (Debian's ``softhsm2``) with its
own configuration and token directory in a temporary folder (``SOFTHSM2_CONF``).

SoftHSM reads its configuration and lists its tokens when the module is initialised, once
per process (python-pkcs11 keeps the module loaded), so ``SoftHsm`` initialises a pool of
tokens up front, before this process loads the module, and hands each test a fresh one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cityedge_fleet.ca_custody import TokenConfig

MODULE_CANDIDATES = (Path("/usr/lib/softhsm/libsofthsm2.so"),
                     Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
                     Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"))
SO_PIN = "so-%s" % os.urandom(4).hex()


def module_path() -> Path | None:
    if shutil.which("softhsm2-util") is None:
        return None
    return next((p for p in MODULE_CANDIDATES if p.exists()), None)


@dataclass
class Token:
    config: TokenConfig
    pin: str


class SoftHsm:
    """``tokens`` SoftHSM2 tokens in ``base``; ``env`` runs a subprocess against them."""

    def __init__(self, base: Path, module: Path, tokens: int) -> None:
        self.base = base
        self.module = module
        (base / "tokens").mkdir(parents=True)
        self.conf = base / "softhsm2.conf"
        self.conf.write_text("directories.tokendir = %s\nobjectstore.backend = file\n"
                             "log.level = ERROR\n" % (base / "tokens"))
        self.env = {"SOFTHSM2_CONF": str(self.conf)}
        self._free: list[Token] = []
        for i in range(tokens):
            label = "cityedge-ca-%d" % i
            pin = os.urandom(6).hex()
            pin_file = base / ("%s.pin" % label)
            pin_file.write_text(pin + "\n")
            pin_file.chmod(0o600)
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                            "--so-pin", SO_PIN, "--pin", pin],
                           env={**os.environ, **self.env}, check=True, capture_output=True,
                           timeout=60)
            self._free.append(Token(TokenConfig(module, label, pin_file), pin))

    def take(self) -> Token:
        """A token no other test used."""
        return self._free.pop(0)

    @property
    def token_dir(self) -> Path:
        return self.base / "tokens"
