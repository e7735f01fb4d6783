"""The CA: `cityedge ca init` keeps the root key offline, issued certificates pass
`openssl verify`, every bad CSR is refused for its own reason, the CRL parses."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cityedge_fleet.ca import (
    CRL_FILE,
    INTERMEDIATE_KEY,
    ROOT_CERT,
    ROOT_KEY,
    CaError,
    CertificateAuthority,
    CsrError,
    Revoked,
    init_ca,
)

from support.fleet import DEVICE, make_csr


def _openssl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=30)


def test_ca_init_cli_writes_root_key_only_to_the_root_dir(tmp_path: Path) -> None:
    root, online = tmp_path / "root", tmp_path / "online"
    r = subprocess.run([sys.executable, "-m", "cityedge.cli", "ca", "init", "--root-dir",
                        str(root), "--out-dir", str(online)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((root / ROOT_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((online / INTERMEDIATE_KEY).stat().st_mode) == 0o600
    assert not list(online.glob("root.key*"))
    assert b"PRIVATE KEY" not in r.stdout.encode()
    again = subprocess.run([sys.executable, "-m", "cityedge.cli", "ca", "init", "--root-dir",
                            str(root), "--out-dir", str(tmp_path / "o2")], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1
    assert again.stderr.startswith("cityedge: ") and "refusing to overwrite" in again.stderr


def test_issued_certificate_passes_openssl_verify(ca_dirs: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    ca = CertificateAuthority(ca_dirs[1])
    csr, _ = make_csr()
    cert = ca.sign_csr(csr, DEVICE, days=90)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    inter = tmp_path / "inter.pem"
    inter.write_text(ca.chain_pem())
    r = _openssl("verify", "-purpose", "sslclient", "-CAfile", str(ca_dirs[1] / ROOT_CERT),
                 "-untrusted", str(inter), str(leaf))
    assert r.returncode == 0 and r.stdout.strip().endswith(b"OK"), r.stderr
    # the extensions the issue asks for, read back by OpenSSL
    text = _openssl("x509", "-noout", "-text", "-in", str(leaf)).stdout.decode()
    assert "CA:FALSE" in text and "Digital Signature" in text
    assert "TLS Web Client Authentication" in text and "URI:%s" % DEVICE in text
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=90) <= life <= dt.timedelta(days=90, minutes=10)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_certificate_from_another_ca_fails_openssl_verify(ca_dirs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    init_ca(tmp_path / "r2", tmp_path / "o2", name="rogue")
    rogue = CertificateAuthority(tmp_path / "o2")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(rogue.sign_csr(make_csr()[0], DEVICE).public_bytes(
        serialization.Encoding.PEM))
    inter = tmp_path / "inter.pem"
    inter.write_text(rogue.chain_pem())
    r = _openssl("verify", "-CAfile", str(ca_dirs[1] / ROOT_CERT), "-untrusted", str(inter),
                 str(leaf))
    assert r.returncode != 0


@pytest.mark.parametrize(("case", "message"), [
    ("cn", "CN 'urn:dev:mac:000000000000' must equal the device id"),
    ("rsa", "must be EC P-256"),
    ("p384", "must be EC P-256"),
    ("garbage", "not a PEM PKCS#10"),
    ("bad-signature", "signature does not verify"),
])
def test_bad_csrs_are_refused_with_a_reason(ca_dirs: tuple[Path, Path], case: str,
                                            message: str) -> None:
    ca = CertificateAuthority(ca_dirs[1])
    if case == "cn":
        csr, _ = make_csr("urn:dev:mac:000000000000")
    elif case == "rsa":
        csr, _ = make_csr(key=rsa.generate_private_key(65537, 2048))
    elif case == "p384":
        csr, _ = make_csr(key=ec.generate_private_key(ec.SECP384R1()))
    elif case == "garbage":
        csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    else:
        good = x509.load_pem_x509_csr(make_csr()[0].encode())
        der = bytearray(good.public_bytes(serialization.Encoding.DER))
        der[-1] ^= 1  # flip a bit of the signature
        csr = x509.load_der_x509_csr(bytes(der)).public_bytes(
            serialization.Encoding.PEM).decode()
    with pytest.raises(CsrError, match=message.replace("(", r"\(")):
        ca.sign_csr(csr, DEVICE)


def test_crl_parses_with_openssl_and_lists_revoked(ca_dirs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    import shutil

    online = tmp_path / "ca"
    shutil.copytree(ca_dirs[1], online)
    ca = CertificateAuthority(online)
    cert = ca.sign_csr(make_csr()[0], DEVICE)
    path = ca.write_crl([Revoked(cert.serial_number, dt.datetime.now(dt.UTC))], 7 * 86400)
    r = _openssl("crl", "-noout", "-text", "-in", str(path))
    assert r.returncode == 0, r.stderr
    listed = [int(line.split(b":", 1)[1], 16) for line in r.stdout.splitlines()
              if line.strip().startswith(b"Serial Number:")]  # openssl may pad a leading 0
    assert listed == [cert.serial_number], r.stdout
    inter = tmp_path / "inter.pem"
    inter.write_text(ca.chain_pem())
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(ca.bundle_pem())
    r = _openssl("verify", "-crl_check", "-CRLfile", str(path), "-CAfile", str(bundle),
                 str(leaf))
    assert r.returncode != 0 and b"revoked" in r.stdout + r.stderr


def test_crl_is_due_when_less_than_half_its_life_remains(ca_dirs: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    import shutil

    online = tmp_path / "ca"
    shutil.copytree(ca_dirs[1], online)
    ca = CertificateAuthority(online)
    ca.write_crl([], 7 * 86400)
    now = dt.datetime.now(dt.UTC)
    assert not ca.crl_due(now)
    assert not ca.crl_due(now + dt.timedelta(days=3))
    assert ca.crl_due(now + dt.timedelta(days=3, hours=13))
    (online / CRL_FILE).unlink()
    assert ca.crl_due(now)


def test_incomplete_ca_dir_is_a_clear_local_error(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="run `cityedge ca init`"):
        CertificateAuthority(tmp_path)
