"""A CA rollover against the real Mosquitto, configured as production is (the fleet's CA
directory: ``broker-ca.pem`` as cafile, ``crl.pem`` as crlfile; devices trusting the root
alone): during the overlap a device of each intermediate connects, a revoked certificate
of each is refused, an issuer without a CRL is refused, and after ``ca retire`` the old
intermediate's certificates are refused although the client sends that intermediate
itself (it chains to the root: only the missing CRL stops it), while a device rotated onto
the new intermediate, still sending the old one after its certificate, connects. And the
firmware's own TLS code (mbedTLS on the MicroPython unix port) trusting the root alone and
presenting its certificate alone connects with a certificate of either intermediate."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from cityedge_fleet import ca_retire, revocation
from cityedge_fleet.ca import (
    ROOT_CERT,
    CertificateAuthority,
    Revoked,
    _cert_pem,
)
from cityedge_fleet.ca_rollover import rollover
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine, migrate

from support.fleet_ca import FleetPKI, device, rollover_world
from support.mosquitto import Mosquitto
from support.mqtt_probe import Probe

WAIT_S = 20.0  # seconds the broker may take to act on a SIGHUP on a busy machine


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "not within %.0f s: %s" % (WAIT_S, what)


def test_overlap_revocation_and_retirement_at_the_real_broker() -> None:
    world, root_dir, ca_dir, files = rollover_world("cityedge-rollover-")
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
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)

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


FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
# the firmware's TLS context (``cityedge_fw.mqtt_async.tls_context``), one MQTT CONNECT,
# the CONNACK's first two bytes printed; any failure prints its exception
MP_CONNECT = """
import socket, sys
from cityedge_fw.mqtt_async import tls_context
def rd(p):
    with open(p, "rb") as f:
        return f.read()
try:
    ctx = tls_context(rd(sys.argv[1]), rd(sys.argv[2]), rd(sys.argv[3]))
    s = socket.socket()
    s.connect(socket.getaddrinfo("127.0.0.1", int(sys.argv[4]))[0][-1])
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.write(b"\\x10\\x0c\\x00\\x04MQTT\\x04\\x02\\x00\\x3c\\x00\\x00")
    print("CONNACK", t.read(4)[:2] == b"\\x20\\x02")
except Exception as e:
    print("REFUSED", repr(e))
"""


def assert_reloaded(sent: bool) -> None:
    assert sent, "the broker was not reloaded"


def test_the_firmwares_tls_trusting_the_root_connects_with_either_intermediate(
        micropython: str) -> None:
    world, root_dir, ca_dir, files = rollover_world("cityedge-rollover-mp-")
    root_der = files / "root.der"
    root_der.write_bytes(CertificateAuthority(ca_dir).root.public_bytes(
        serialization.Encoding.DER))
    script = files / "connect.py"
    script.write_text(MP_CONNECT)
    cns = ["urn:dev:mac:0024befffe80%04x" % n for n in (1, 2)]
    broker = Mosquitto(FleetPKI(ca_dir, files), crl_file=ca_dir / "crl.pem",  # type: ignore[arg-type]
                       clients=cns).start()

    def der_device(n: int) -> tuple[Path, Path]:
        """The firmware's files: the certificate alone (``cert.der``), the SEC1 key."""
        dev = device(ca_dir, files, n)
        cert = x509.load_pem_x509_certificate(dev.cert_pem.read_bytes())
        key = serialization.load_pem_private_key(dev.key_pem.read_bytes(), None)
        cert_der, key_der = files / ("dev%d.der" % n), files / ("dev%d.key.der" % n)
        cert_der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        key_der.write_bytes(key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        return cert_der, key_der

    def mp_connects(cert_der: Path, key_der: Path) -> str:
        r = subprocess.run([micropython, "-X", "heapsize=256k", str(script), str(cert_der),
                            str(key_der), str(root_der), str(broker.port)],
                           env={"MICROPYPATH": ".frozen:%s" % FIRMWARE, "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60)
        return (r.stdout + r.stderr).strip()

    try:
        old = der_device(1)
        assert mp_connects(*old) == "CONNACK True"
        rollover(root_dir, ca_dir,
                 before_switch=lambda: assert_reloaded(revocation.reload_broker(broker.pid_file)))
        new = der_device(2)
        deadline = time.monotonic() + WAIT_S
        while (got := mp_connects(*new)) != "CONNACK True":
            assert time.monotonic() < deadline, got
        assert mp_connects(*old) == "CONNACK True"
        with_settings = Settings(mode="development", ca_dir=ca_dir,
                                 database_url="sqlite:///%s" % (world / "f.db"),
                                 broker_pid_file=broker.pid_file,
                                 audit_key_file=world / "audit.key",
                                 command_key_file=world / "command.key")
        engine = make_engine(with_settings, create=True)
        migrate(engine, create=True)
        try:
            with Session(engine) as session:
                ca_retire.retire(session, ca_dir, with_settings, by="test")
        finally:
            engine.dispose()
        deadline = time.monotonic() + WAIT_S
        while (got := mp_connects(*old)).startswith("CONNACK"):
            assert time.monotonic() < deadline, got
        assert got.startswith("REFUSED"), got
        assert mp_connects(*new) == "CONNACK True"
    finally:
        broker.cleanup()
        shutil.rmtree(world, ignore_errors=True)
