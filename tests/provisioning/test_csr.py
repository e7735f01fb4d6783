"""The on-device CSR: built by the pure-Python core on CPython and on the MicroPython unix
port, then checked by independent implementations (cryptography, ``openssl req -verify``)
and accepted by the fleet's CA."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import csr, p256
from cityedge_fleet.ca import CertificateAuthority, init_ca

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "urn:dev:mac:0024befffe804ff1"

MP_SCRIPT = """
import sys, os, binascii
sys.path.insert(0, 'firmware')
from cityedge_core import csr, p256
k = p256.PrivateKey.generate(os.urandom)
print(binascii.hexlify(csr.build_csr(k, %r)).decode())
print(binascii.hexlify(csr.ec_private_key_der(k)).decode())
"""


def build_on_cpython(device: str = DEVICE) -> tuple[bytes, bytes]:
    key = p256.PrivateKey.generate(os.urandom)
    return csr.build_csr(key, device), csr.ec_private_key_der(key)


def build_on_micropython(micropython: str, device: str = DEVICE) -> tuple[bytes, bytes]:
    res = subprocess.run([micropython, "-X", "heapsize=64k", "-c", MP_SCRIPT % device],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    csr_hex, key_hex = res.stdout.split()
    return bytes.fromhex(csr_hex), bytes.fromhex(key_hex)


def check_with_cryptography(der: bytes, key_der: bytes, device: str = DEVICE) -> None:
    req = x509.load_der_x509_csr(der)
    assert req.is_signature_valid
    assert req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
    san = req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device]
    key = serialization.load_der_private_key(key_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key().public_numbers() == req.public_key().public_numbers()  # type: ignore[union-attr]


def check_with_openssl(der: bytes, tmp_path: Path) -> None:
    path = tmp_path / "req.der"
    path.write_bytes(der)
    res = subprocess.run(["openssl", "req", "-inform", "DER", "-in", str(path), "-verify",
                          "-noout"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "verify OK" in res.stdout + res.stderr, res.stderr
    pem = tmp_path / "req.pem"
    pem.write_text(csr.pem("CERTIFICATE REQUEST", der))
    res = subprocess.run(["openssl", "req", "-in", str(pem), "-verify", "-noout"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "verify OK" in res.stdout + res.stderr, res.stderr


def test_csr_built_on_cpython_verifies(tmp_path: Path) -> None:
    der, key_der = build_on_cpython()
    check_with_cryptography(der, key_der)
    check_with_openssl(der, tmp_path)


def test_csr_built_on_micropython_verifies(micropython: str, tmp_path: Path) -> None:
    der, key_der = build_on_micropython(micropython)
    check_with_cryptography(der, key_der)
    check_with_openssl(der, tmp_path)


def test_tampered_csr_is_refused(tmp_path: Path) -> None:
    der = bytearray(build_on_cpython()[0])
    i = der.find(DEVICE.encode())
    der[i + len(DEVICE) - 1] ^= 1  # another device id, same signature
    assert not x509.load_der_x509_csr(bytes(der)).is_signature_valid
    path = tmp_path / "bad.der"
    path.write_bytes(bytes(der))
    res = subprocess.run(["openssl", "req", "-inform", "DER", "-in", str(path), "-verify",
                          "-noout"], capture_output=True, text=True, timeout=30)
    # OpenSSL 3.0 exits 0 even when the self-signature fails: read what it says
    assert "verify OK" not in res.stdout + res.stderr
    assert "verify failure" in res.stderr, res.stderr


def test_fleet_ca_signs_the_device_csr(tmp_path: Path) -> None:
    init_ca(tmp_path / "root", tmp_path / "online")
    ca = CertificateAuthority(tmp_path / "online")
    der, key_der = build_on_cpython()
    cert = ca.sign_csr(csr.pem("CERTIFICATE REQUEST", der), DEVICE)
    sec1 = p256.PrivateKey.from_bytes(_scalar(key_der)).public_key().to_sec1()
    assert cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint) == sec1


def _scalar(key_der: bytes) -> bytes:
    i = key_der.find(b"\x02\x01\x01\x04\x20")
    return key_der[i + 5:i + 37]


@pytest.mark.parametrize("bad", ["", "dev:mac:00", "urn:dev:mac:" + "0" * 200,
                                 "urn:dev:mac:00 11", "urn:dev:mac:é"])
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        csr.build_csr(p256.PrivateKey(12345), bad)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, p256.N - 1),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:-._", min_size=1, max_size=100))
def test_any_key_and_device_id_verify(d: int, suffix: str) -> None:
    device = "urn:dev:" + suffix
    key = p256.PrivateKey(d)
    check_with_cryptography(csr.build_csr(key, device), csr.ec_private_key_der(key), device)
