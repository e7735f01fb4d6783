"""The broker follows the registry, against a real Mosquitto and the real fleet app on
SQLite and PostgreSQL: enrollment grants a device before it answers (or refuses while the
broker cannot be told), quarantine and retirement close the device's live session and put
its certificate on the CRL, revocation closes the live session at once, reactivation lets
it back in, and the reconciler catches up with what another process committed."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from cityedge_core import topics
from cityedge_fleet import registry
from cityedge_fleet.app import create_app
from cityedge_fleet.broker_sync import Reconciler
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.models import AuditRecord, Credential, Device, DeviceState, Role
from cityedge_fleet.serve import refresh_crl
from cityedge_host.crypto import EcSigner

from support.fleet import Api, csr_for, device_body
from support.fleet_ca import fleet_ca_from_pki
from support.mosquitto import Mosquitto, TestPKI
from support.mqtt_probe import Probe

DENIED = 135


class Fleet(SimpleNamespace):
    api: Api
    broker: Mosquitto
    settings: Settings
    ca: CertificateAuthority
    world: Path


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    world = Path(tempfile.mkdtemp(prefix="cityedge-sync-"))
    world.chmod(0o755)  # the broker reads the fleet's CRL as its own user
    ca_dir = fleet_ca_from_pki(pki, world / "ca")
    ca_dir.chmod(0o755)
    ca = CertificateAuthority(ca_dir)
    ca.write_crl([], 86400)
    broker = Mosquitto(pki, crl_file=ca.crl_path).start()
    control, ingest = pki.service("fleet-control"), pki.service("fleet-ingest")
    settings = Settings(
        mode="development", database_url=db_url, ca_dir=ca_dir,
        broker_url="mqtts://127.0.0.1:%d" % broker.port, broker_pid_file=broker.pid_file,
        mqtt_port=broker.port, mqtt_ca_file=pki.ca_pem, mqtt_cert_file=ingest.cert_pem,
        mqtt_key_file=ingest.key_pem, broker_control_cert_file=control.cert_pem,
        broker_control_key_file=control.key_pem, ingest_with_serve=False,
        limits=FleetLimits(broker_control_timeout_s=10.0))
    app = create_app(settings, init_db=True)
    try:
        with TestClient(app) as client:
            yield Fleet(api=Api(client, settings), broker=broker, settings=settings, ca=ca,
                        world=world)
    finally:
        app.state.broker_access.close()
        app.state.engine.dispose()
        broker.cleanup()
        shutil.rmtree(world, ignore_errors=True)


def _enroll(f: Fleet, i: int) -> tuple[str, SimpleNamespace, int]:
    """Register and enroll device ``i``: (id, its certificate files, certificate serial)."""
    body = device_body(i)
    tech = f.api.headers(Role.technician)
    assert f.api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = f.api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                              headers=tech).json()["token"]
    signer = EcSigner.generate()
    r = f.api.client.post("/enroll", json={"serial": body["serial"], "token": token,
                                           "csr_pem": csr_for(signer, str(body["id"]))})
    assert r.status_code == 200, r.text
    d = f.world / str(i)
    d.mkdir()
    (d / "chain.pem").write_text(r.json()["chain_pem"])
    (d / "key.pem").write_bytes(signer.private_pem())
    for p in d.iterdir():
        p.chmod(0o644)
    cert = x509.load_pem_x509_certificate(r.json()["certificate_pem"].encode())
    return str(body["id"]), SimpleNamespace(cert_pem=d / "chain.pem", key_pem=d / "key.pem"), \
        cert.serial_number


def _connect(f: Fleet, creds: SimpleNamespace) -> Probe:
    return Probe(f.broker, creds)  # type: ignore[arg-type]


def _refused_at_tls(f: Fleet, creds: SimpleNamespace) -> bool:
    try:
        _connect(f, creds).close()
    except (ssl.SSLError, OSError):  # ConnectionRefusedError: closed before CONNACK
        return True
    return False


def _works(probe: Probe, device: str) -> bool:
    return probe.publish(topics.up(device, topics.READINGS), b"batch") < 0x80


def _crl(f: Fleet) -> dict[int, x509.ReasonFlags | None]:
    crl = x509.load_pem_x509_crl(f.ca.crl_path.read_bytes())
    out: dict[int, x509.ReasonFlags | None] = {}
    for entry in crl:
        try:
            out[entry.serial_number] = entry.extensions.get_extension_for_class(
                x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            out[entry.serial_number] = None
    return out


def _state(f: Fleet, device: str, state: str) -> int:
    return f.api.client.post("/devices/%s/state" % device, json={"state": state},
                             headers=f.api.headers(Role.security)).status_code


def test_enrollment_grants_the_device_before_it_answers(fleet: Fleet) -> None:
    access = fleet.broker.access
    assert not any(c.startswith("urn:") for c in access.clients())
    device, creds, _ = _enroll(fleet, 1)
    assert device in access.clients()
    probe = _connect(fleet, creds)
    try:
        assert _works(probe, device)
        assert probe.subscribe(topics.down(device, topics.CMD))
        assert probe.publish(topics.up("urn:dev:mac:0024befffe800002", "readings"), b"x") \
            == DENIED
    finally:
        probe.close()


def test_enrollment_is_refused_while_the_broker_cannot_be_told(fleet: Fleet) -> None:
    body = device_body(7)
    tech = fleet.api.headers(Role.technician)
    assert fleet.api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = fleet.api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                                  headers=tech).json()["token"]
    request = {"serial": body["serial"], "token": token,
               "csr_pem": csr_for(EcSigner.generate(), str(body["id"]))}
    fleet.broker.stop()
    r = fleet.api.client.post("/enroll", json=request)
    assert r.status_code == 503, r.text
    with Session(fleet.api.engine) as s:
        device = s.get(Device, str(body["id"]))
        assert device is not None and device.state == DeviceState.registered
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "enroll")).all()
        assert [row.outcome for row in rows] == ["error"]
        assert "broker" in rows[0].detail
    fleet.broker.start()
    assert fleet.api.client.post("/enroll", json=request).status_code == 200  # token unused


def test_quarantine_cuts_the_session_and_holds_the_certificate_until_reactivated(
        fleet: Fleet) -> None:
    device, creds, serial = _enroll(fleet, 2)
    other, other_creds, _ = _enroll(fleet, 3)
    probe = _connect(fleet, creds)
    try:
        assert _works(probe, device)
        assert _state(fleet, device, "quarantined") == 200
        probe.wait_for(lambda: probe.disconnects >= 1, "the broker closing the session")
    finally:
        probe.close()
    assert _crl(fleet) == {serial: x509.ReasonFlags.certificate_hold}
    assert _refused_at_tls(fleet, creds)
    assert device not in fleet.broker.access.clients()
    bystander = _connect(fleet, other_creds)  # nobody else is touched
    try:
        assert _works(bystander, other)
    finally:
        bystander.close()
    assert _state(fleet, device, "active") == 200
    assert _crl(fleet) == {}
    back = _connect(fleet, creds)
    try:
        assert _works(back, device)
    finally:
        back.close()


def test_retirement_revokes_for_good_and_cuts_the_session(fleet: Fleet) -> None:
    device, creds, serial = _enroll(fleet, 4)
    probe = _connect(fleet, creds)
    try:
        assert _state(fleet, device, "retired") == 200
        probe.wait_for(lambda: probe.disconnects >= 1, "the broker closing the session")
    finally:
        probe.close()
    assert _crl(fleet) == {serial: None}
    assert _refused_at_tls(fleet, creds)
    assert device not in fleet.broker.access.clients()


def test_revoking_a_certificate_closes_the_live_session_at_once(fleet: Fleet) -> None:
    device, creds, serial = _enroll(fleet, 5)
    probe = _connect(fleet, creds)
    try:
        assert _works(probe, device)
        sec = fleet.api.headers(Role.security)
        r = fleet.api.client.post("/devices/%s/credentials/%x/revoke" % (device, serial),
                                  headers=sec)
        assert r.status_code == 200, r.text
        probe.wait_for(lambda: probe.disconnects >= 1, "the broker closing the session")
    finally:
        probe.close()
    assert serial in _crl(fleet)
    assert _refused_at_tls(fleet, creds)


def test_the_reconciler_catches_up_with_what_another_process_committed(fleet: Fleet) -> None:
    """The ingest (another process) quarantines a device; a device lost its grant while the
    broker was restored from an old backup; a name the registry does not know is granted."""
    quarantined, q_creds, q_serial = _enroll(fleet, 8)
    missing, m_creds, _ = _enroll(fleet, 9)
    stray = "urn:dev:mac:0024befffe80ffff"
    with Session(fleet.api.engine) as s:  # what Ingestor._forgery commits
        device = s.get(Device, quarantined)
        assert device is not None
        registry.set_state(s, device=device, state=DeviceState.quarantined)
        s.commit()
    fleet.broker.cut(missing)
    fleet.broker.grant(stray)
    probe = _connect(fleet, q_creds)
    reconciler = Reconciler(fleet.broker.access, lambda: Session(fleet.api.engine), 3600,
                            also=refresh_crl(fleet.settings))
    try:
        assert _works(probe, quarantined)  # nothing has told the broker yet
        done = reconciler.round()
        probe.wait_for(lambda: probe.disconnects >= 1, "the broker closing the session")
    finally:
        probe.close()
    assert (done.granted, done.cut) == ([missing], sorted([quarantined, stray]))
    assert _crl(fleet) == {q_serial: x509.ReasonFlags.certificate_hold}
    assert _refused_at_tls(fleet, q_creds)
    back = _connect(fleet, m_creds)
    try:
        assert _works(back, missing)
    finally:
        back.close()
    again = reconciler.round()
    assert (again.granted, again.cut) == ([], [])


def test_a_device_the_ingest_quarantines_is_cut_at_once(fleet: Fleet) -> None:
    """``fleet serve``'s wiring: forged batches quarantine the device in the ingest's
    transaction, and the reconciler, woken by it (its period is an hour here), closes the
    device's session and suspends its certificate."""
    from cityedge_core import batch as batchmod
    from cityedge_fleet.serve import ingestor_for
    from cityedge_host.crypto import EcSigner as Signer

    device, creds, serial = _enroll(fleet, 10)
    reconciler = Reconciler(fleet.broker.access, lambda: Session(fleet.api.engine), 3600,
                            also=refresh_crl(fleet.settings)).start()
    probe = _connect(fleet, creds)
    try:
        reconciler_rounds = reconciler.rounds
        ingest = ingestor_for(fleet.settings, fleet.api.engine, reconciler)
        with Session(fleet.api.engine) as s:
            cred = s.exec(select(Credential).where(Credential.device_id == device)).one()
        forger = batchmod.BatchWriter(device, Signer.generate(), bytes.fromhex(cred.kid))
        for _ in range(fleet.settings.limits.quarantine_after_forgeries):
            out = ingest.handle(topics.up(device, topics.READINGS),
                                forger.sign([{0: "t", 2: 1.0, 6: 1.7e9}], boot=1))
            assert out.status == "bad_signature"
        probe.wait_for(lambda: probe.disconnects >= 1, "the broker closing the session")
        assert reconciler.rounds > reconciler_rounds
    finally:
        probe.close()
        reconciler.stop()
    assert _crl(fleet) == {serial: x509.ReasonFlags.certificate_hold}
    assert _refused_at_tls(fleet, creds)
