"""The root rollover procedure of docs/SECURITY_TEAM.md ("Roll the root over"), checked
against ``openssl verify`` and the real Mosquitto: a new root R2, its key certified by
the old root R1 (the cross-certificate), a new intermediate signed by R2, and a broker
whose server chain is leaf → intermediate → cross-certificate. A device that trusts only
R1 (enrolled before) and one that trusts only R2 (enrolled after) both accept the broker;
without the cross-certificate the R1-only device does not."""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_fleet.ca import (
    BACKDATE_S,
    ROOT_PATH_LENGTH,
    _ca_cert,
    _cert_pem,
    _key_pem,
    _name,
)

from support.mosquitto import Mosquitto
from support.mqtt_probe import Probe


def _root(name: str, path_length: int = ROOT_PATH_LENGTH
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A root as ``ca init`` makes it."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _ca_cert(_name(name), _name(name), key.public_key(), key, 3650, path_length,
                         key.public_key())


def _leaf(cn: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def _verify(trust: Path, untrusted: list[x509.Certificate], leaf: x509.Certificate,
            tmp: Path) -> bool:
    (tmp / "u.pem").write_bytes(b"".join(_cert_pem(c) for c in untrusted))
    (tmp / "l.pem").write_bytes(_cert_pem(leaf))
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(trust),
                        "-untrusted", str(tmp / "u.pem"), str(tmp / "l.pem")],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def test_a_cross_signed_new_root_serves_devices_of_either_root() -> None:
    world = Path(tempfile.mkdtemp(prefix="cityedge-root-rollover-"))
    world.chmod(0o755)
    try:
        _run(world)
    finally:
        shutil.rmtree(world, ignore_errors=True)


def _run(world: Path) -> None:
    r1_key, r1 = _root("cityedge root CA")
    r2_key, r2 = _root("cityedge root CA 2")
    # step 2: the cross-certificate, R2's name and key certified by R1
    cross = _ca_cert(r2.subject, r1.subject, r2_key.public_key(), r1_key, 3650, 1,
                     r1_key.public_key())
    # step 3: the next intermediate is signed by R2
    i2_key = ec.generate_private_key(ec.SECP256R1())
    i2 = _ca_cert(_name("cityedge device CA g3"), r2.subject, i2_key.public_key(), r2_key,
                  365, 0, r2_key.public_key())
    server_key, server = _leaf("broker", i2, i2_key, server=True)
    for name, cert in (("r1", r1), ("r2", r2)):
        (world / (name + ".pem")).write_bytes(_cert_pem(cert))
    # openssl: either root alone accepts leaf → I2 → cross; R1 alone needs the cross
    assert _verify(world / "r2.pem", [i2, cross], server, world)
    assert _verify(world / "r1.pem", [i2, cross], server, world)
    assert not _verify(world / "r1.pem", [i2], server, world)
    # a root made before issue 14 (path length 1) cannot lead to the next root's
    # intermediates: its devices need the new root pushed (the procedure's other branch)
    old_key, old = _root("cityedge root CA", path_length=1)
    old_cross = _ca_cert(r2.subject, old.subject, r2_key.public_key(), old_key, 3650, 1,
                         old_key.public_key())
    (world / "old.pem").write_bytes(_cert_pem(old))
    assert not _verify(world / "old.pem", [i2, old_cross], server, world)

    # the real broker: its server chain carries the cross-certificate; its cafile both
    # roots and the intermediate, its CRL one for the intermediate (the leaves' issuer)
    files = world / "files"
    files.mkdir(mode=0o755)
    chain = files / "server.crt"
    chain.write_bytes(_cert_pem(server) + _cert_pem(i2) + _cert_pem(cross))
    (files / "server.key").write_bytes(_key_pem(server_key))
    cafile = files / "ca.pem"
    cafile.write_bytes(_cert_pem(i2) + _cert_pem(r2) + _cert_pem(r1))
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(i2.subject)
           .last_update(now - dt.timedelta(seconds=BACKDATE_S))
           .next_update(now + dt.timedelta(days=1)).sign(i2_key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    (files / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    device_cn = "urn:dev:mac:0024befffe800001"
    dev_key, dev = _leaf(device_cn, i2, i2_key, server=False)
    (files / "dev.crt").write_bytes(_cert_pem(dev) + _cert_pem(i2))
    (files / "dev.key").write_bytes(_key_pem(dev_key))
    for p in files.iterdir():
        p.chmod(0o644)
    creds = SimpleNamespace(cert_pem=files / "dev.crt", key_pem=files / "dev.key")
    pki = SimpleNamespace(dir=files, ca_pem=cafile,
                          server=SimpleNamespace(cert_pem=chain, key_pem=files / "server.key"),
                          service=lambda cn: creds)
    broker = Mosquitto(pki, crl_file=files / "crl.pem", clients=[device_cn])  # type: ignore[arg-type]
    broker.start()
    try:
        for trust in ("r1.pem", "r2.pem"):  # enrolled before / after the root rollover
            Probe(broker, creds, ca=world / trust).close()  # type: ignore[arg-type]
        chain.write_bytes(_cert_pem(server) + _cert_pem(i2))  # without the cross-cert
        broker.restart()
        Probe(broker, creds, ca=world / "r2.pem").close()  # type: ignore[arg-type]
        try:
            Probe(broker, creds, ca=world / "r1.pem").close()  # type: ignore[arg-type]
            raise AssertionError("an R1-only device accepted a chain without the cross")
        except ssl.SSLError:
            pass
    finally:
        broker.cleanup()
