"""``cityedge ca issue-service``: certificates for the broker and the fleet's own services."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cityedge_fleet.ca import CaError, CertificateAuthority, issue_service


def _verify(root: Path, chain: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    leaf = chain.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    leaf_path = chain.with_suffix(".leaf.pem")
    leaf_path.write_text(leaf)
    return subprocess.run(["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain),
                           "-purpose", purpose, str(leaf_path)], capture_output=True, text=True)


def test_server_and_client_certificates_verify(ca_dirs: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    _root_dir, ca_dir = ca_dirs
    ca = CertificateAuthority(ca_dir)
    root = tmp_path / "root.pem"
    root.write_text(ca.root_pem())
    crt, key = issue_service(ca, "broker", tmp_path, ("localhost", "127.0.0.1"))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _verify(root, crt, "sslserver").returncode == 0
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    crt2, _ = issue_service(ca, "fleet-ingest", tmp_path)
    assert _verify(root, crt2, "sslclient").returncode == 0
    eku = x509.load_pem_x509_certificate(crt2.read_bytes()).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_unknown_service_name_is_refused(ca_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(CaError, match="fleet-ingest"):
        issue_service(CertificateAuthority(ca_dirs[1]), "urn:dev:mac:000000000001", tmp_path)
