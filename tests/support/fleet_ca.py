"""The fleet's CA directory made from a test PKI, so the test broker trusts what the fleet
issues (one CA as both root and intermediate)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from support.mosquitto import TestPKI


def fleet_ca_from_pki(pki: TestPKI, ca_dir: Path) -> Path:
    ca_dir.mkdir(parents=True, exist_ok=True)
    (ca_dir / "intermediate.key").write_bytes(pki.ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (ca_dir / "intermediate.key").chmod(0o600)
    (ca_dir / "intermediate.crt").write_bytes(pki.ca_pem.read_bytes())
    (ca_dir / "root.crt").write_bytes(pki.ca_pem.read_bytes())
    return ca_dir
