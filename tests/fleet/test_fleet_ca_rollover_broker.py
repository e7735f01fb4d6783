"""A CA rollover against the real Mosquitto, configured as production is (the fleet's CA
directory: ``broker-ca.pem`` as cafile, ``crl.pem`` as crlfile; devices trusting the root
alone): during the overlap a device of each intermediate connects, a revoked certificate
of each is refused, an issuer without a CRL is refused, and after ``ca retire`` the old
intermediate's certificates are refused although the client sends that intermediate
itself (it chains to the root: only the missing CRL stops it), while a device rotated onto
the new intermediate, still sending the old one after its certificate, connects."""

from __future__ import annotations

import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session

from cityedge_fleet import ca_retire, revocation
from cityedge_fleet.ca import (
    ROOT_CERT,
    CertificateAuthority,
    Revoked,
    _cert_pem,
    init_ca,
    issue_service,
)
from cityedge_fleet.ca_rollover import rollover
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine, migrate

from support.fleet import make_csr
from support.mosquitto import Mosquitto
from support.mqtt_probe import Probe

WAIT_S = 20.0  # seconds the broker may take to act on a SIGHUP on a busy machine


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


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "not within %.0f s: %s" % (WAIT_S, what)


def test_overlap_revocation_and_retirement_at_the_real_broker() -> None:
    world = Path(tempfile.mkdtemp(prefix="cityedge-rollover-"))
    world.chmod(0o755)
    root_dir, ca_dir, files = world / "root", world / "ca", world / "files"
    init_ca(root_dir, ca_dir)
    ca_dir.chmod(0o755)
    files.mkdir(mode=0o755)
    root = ca_dir / ROOT_CERT  # what every device trusts for the broker
    old_a, old_x = device(ca_dir, files, 1), device(ca_dir, files, 2)
    old_chain = CertificateAuthority(ca_dir).cert
    cns = ["urn:dev:mac:0024befffe80%04x" % n for n in range(1, 6)]
    broker = Mosquitto(FleetPKI(ca_dir, files), crl_file=ca_dir / "crl.pem",  # type: ignore[arg-type]
                       clients=cns).start()
    settings = Settings(mode="development", database_url="sqlite:///%s" % (world / "f.db"),
                        ca_dir=ca_dir, broker_pid_file=broker.pid_file,
                        audit_key_file=world / "audit.key",
                        command_key_file=world / "command.key", ingest_with_serve=False)
    engine = make_engine(settings)
    migrate(engine)

    def connects(dev: SimpleNamespace) -> bool:
        try:
            Probe(broker, dev, ca=root).close()  # type: ignore[arg-type]
        except (ssl.SSLError, OSError):
            return False
        return True

    def reload() -> None:
        assert revocation.reload_broker(broker.pid_file)

    try:
        assert connects(old_a) and connects(old_x)
        done = rollover(root_dir, ca_dir, before_switch=reload)
        new_b, new_y = device(ca_dir, files, 3), device(ca_dir, files, 4)
        # a device rotated during the overlap: its new certificate, then the intermediate
        # of its old chain (install-cert carries the certificate alone)
        rotated = device(ca_dir, files, 5)
        leaf = rotated.cert_pem.read_bytes().split(b"-----END CERTIFICATE-----")[0]
        rotated.cert_pem.write_bytes(leaf + b"-----END CERTIFICATE-----\n"
                                     + _cert_pem(old_chain))
        assert new_b.issuer == new_y.issuer == done.new_id != old_a.issuer
        # the overlap: both intermediates are trusted
        wait_until(lambda: connects(new_b), "a new intermediate's device connects")
        assert connects(old_a) and connects(new_y) and connects(rotated)

        # an issuer without a CRL is refused (Mosquitto's CRL check): the reason the CRL
        # file holds one CRL per intermediate
        ca = CertificateAuthority(ca_dir)
        old = ca.overlap[0]
        ca.crl_path.write_bytes(ca.make_crl([], 3600, issuer=old))
        reload()
        wait_until(lambda: not connects(new_b), "no CRL of its issuer refuses it")
        assert connects(old_a)
        ca.write_crl([], 3600)
        reload()
        wait_until(lambda: connects(new_b), "its CRL is back")

        # revocation during the overlap, one certificate of each intermediate
        now = ca.cert.not_valid_before_utc
        ca.write_crl([Revoked(old_x.serial, now), Revoked(new_y.serial, now)], 3600)
        reload()
        wait_until(lambda: not connects(old_x), "the old intermediate's revoked cert")
        wait_until(lambda: not connects(new_y), "the new intermediate's revoked cert")
        assert connects(old_a) and connects(new_b)

        # retirement: the old intermediate's CRL and trust go; its devices are refused,
        # even one sending the old intermediate itself; the new one's still connect
        with Session(engine) as session:
            result = ca_retire.retire(session, ca_dir, settings, by="test")
        assert result.retired == [old_a.issuer] and result.broker_reloaded
        wait_until(lambda: not connects(old_a), "the retired intermediate's device")
        assert connects(new_b) and connects(rotated)
    finally:
        engine.dispose()
        broker.cleanup()
        shutil.rmtree(world, ignore_errors=True)
