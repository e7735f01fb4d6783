"""The fleet's CA directory made from a test PKI, so the test broker trusts what the fleet
issues (one CA as both root and intermediate); and the other way round, a test broker's PKI
made from the fleet's own CA directory (``FleetPKI``) with devices of the intermediate that
signs now (``device``), for the CA rollover tests against real brokers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_fleet.ca import CertificateAuthority, _cert_pem, init_ca, issue_service

from support.fleet import make_csr
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


class FleetPKI:
    """What ``support.mosquitto.Mosquitto`` needs of a PKI, from the fleet's own CA: the
    cafile is the CA directory's ``broker-ca.pem``, the server certificate is issued by
    the intermediate that signs at the start, as ``ca issue-service --server`` does."""

    def __init__(self, ca_dir: Path, out: Path) -> None:
        self.dir = out
        self.ca_dir = ca_dir
        self.ca_pem = CertificateAuthority(ca_dir).broker_bundle_path
        self.server = self.service("broker", ("127.0.0.1", "localhost"))

    def service(self, cn: str, server: tuple[str, ...] = ()) -> SimpleNamespace:
        cert, key = issue_service(CertificateAuthority(self.ca_dir), cn, self.dir, server)
        key.chmod(0o644)  # a throwaway test key Mosquitto reads as its own user
        return SimpleNamespace(cert_pem=cert, key_pem=key)


def rollover_world(prefix: str) -> tuple[Path, Path, Path, Path]:
    """A fresh fleet CA for a rollover test against a real broker: ``(world, root_dir,
    ca_dir, files)``, the world in the system's temporary directory (short paths for the
    brokers' sockets) and readable by a broker running as its own user; the caller
    removes ``world``."""
    world = Path(tempfile.mkdtemp(prefix=prefix))
    world.chmod(0o755)
    root_dir, ca_dir, files = world / "root", world / "ca", world / "files"
    init_ca(root_dir, ca_dir)
    ca_dir.chmod(0o755)
    files.mkdir(mode=0o755)
    return world, root_dir, ca_dir, files


def device(ca_dir: Path, out: Path, n: int) -> SimpleNamespace:
    """A device certificate from the intermediate that signs now; the file holds the leaf
    and its intermediate, as a gateway presents them."""
    cn = "urn:dev:mac:0024befffe80%04x" % n
    key = ec.generate_private_key(ec.SECP256R1())
    ca = CertificateAuthority(ca_dir)
    cert = ca.sign_csr(make_csr(cn, key)[0], cn)
    chain, key_file = out / ("dev%d.crt" % n), out / ("dev%d.key" % n)
    chain.write_bytes(_cert_pem(cert) + _cert_pem(ca.cert))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return SimpleNamespace(cn=cn, serial=cert.serial_number, issuer=ca.id, cert_pem=chain,
                           key_pem=key_file)
