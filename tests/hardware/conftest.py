"""Session fixtures: eFuse captures from esptool's virtual chips (``support.efuse_virt``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.efuse_virt import HARDENED_CHIPS, OTHER_CHIPS, Captures, burn, lock, summary


@pytest.fixture(scope="session")
def virt_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    (d / "flash_key.bin").write_bytes(bytes(range(1, 33)))  # a test key, never a real one
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    (d / "signing.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    return d


@pytest.fixture(scope="session")
def captures(tmp_path_factory: pytest.TempPathFactory, virt_keys: Path) -> Captures:
    d = tmp_path_factory.mktemp("efuse")

    def blank(chip: str) -> tuple[str, Path]:
        return chip, summary(chip, d / ("%s-blank.bin" % chip), d / ("%s-blank.json" % chip))

    def hardened(chip: str) -> tuple[str, tuple[Path, Path]]:
        efuses = d / ("%s-hardened.bin" % chip)
        burn(chip, efuses, virt_keys)
        burned = summary(chip, efuses, d / ("%s-burned.json" % chip))
        lock(chip, efuses)
        return chip, (burned, summary(chip, efuses, d / ("%s-hardened.json" % chip)))

    with ThreadPoolExecutor(max_workers=2) as pool:
        blanks = pool.map(blank, HARDENED_CHIPS)
        hards = pool.map(hardened, HARDENED_CHIPS)
        blank_map, hard_map = dict(blanks), dict(hards)
    return Captures(blank=blank_map, burned={c: p[0] for c, p in hard_map.items()},
                    hardened={c: p[1] for c, p in hard_map.items()},
                    efuse_files={c: d / ("%s-hardened.bin" % c) for c in HARDENED_CHIPS})


@pytest.fixture(scope="session")
def other_blanks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Blank captures of the chips the rules are not tested both ways on."""
    d = tmp_path_factory.mktemp("efuse-other")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(lambda c: (c, summary(c, d / (c + ".bin"), d / (c + ".json"))),
                             OTHER_CHIPS))
