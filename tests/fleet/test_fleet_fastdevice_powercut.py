"""The fast device's key slots across a power cut at every file operation of a rotation,
against the real fleet (API, ingest, CA, command queue; SQLite): the device's messages go
straight to the ingest and the fleet's queued commands straight to the device (the broker's
part is tested end to end in ``test_fleet_rotation_e2e``). Cut after the Nth write or
removal, the device boots with a current key whose certificate holds it and is active at
the fleet, signs a batch the ingest takes on the same chain, and a rotation then runs to
``old-revoked``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509
from sqlmodel import Session, col, select

from cityedge import fastdevice
from cityedge.fastdevice import FastDevice, provision
from cityedge_core import chain, rotation
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import (
    PENDING_COMMANDS,
    Credential,
    CredentialStatus,
    FleetCommand,
    KeyRotation,
    Role,
)
from cityedge_host.crypto import load_signer, public_sec1

from support.fleet import Api, enroll_device
from support.rotation import rotation_row


class PowerCut(BaseException):
    """The power went: nothing after this runs (not an error the device could catch)."""


class LoopClient:
    """The device's MQTT client with the broker taken out: what it publishes goes to the
    ingest at once."""

    def __init__(self, ingest: Ingestor) -> None:
        self.ingest = ingest
        self.statuses: list[str] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.statuses.append(self.ingest.handle(topic, payload).status)


class Cutter:
    """Counts the device's file operations; raises ``PowerCut`` at number ``at``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None) -> None:
        self.n = 0
        self.at = at
        real_write, real_remove = fastdevice.write_atomic, fastdevice.remove

        def write(path: Path, data: bytes, mode: int = 0o600) -> None:
            self._tick()
            real_write(path, data, mode)

        def remove(path: Path) -> None:
            self._tick()
            real_remove(path)

        monkeypatch.setattr(fastdevice, "write_atomic", write)
        monkeypatch.setattr(fastdevice, "remove", remove)

    def _tick(self) -> None:
        self.n += 1
        if self.at is not None and self.n == self.at:
            raise PowerCut


def boot(d: Path, ing: Ingestor, old: FastDevice | None = None) -> FastDevice:
    dev = FastDevice(d, "127.0.0.1", 1, chain=(old.writer.seq, old.writer.head)
                     if old is not None else None)
    dev._client = LoopClient(ing)  # type: ignore[assignment]
    return dev


def pending_commands(api: Api, device: str) -> list[FleetCommand]:
    with Session(api.engine) as s:
        rows = list(s.exec(select(FleetCommand).where(
            col(FleetCommand.device_id) == device,
            col(FleetCommand.state).in_(PENDING_COMMANDS)).order_by(col(FleetCommand.seq))))
        for r in rows:
            s.expunge(r)
        return rows


def latest_rotation(api: Api, device: str) -> KeyRotation | None:
    with Session(api.engine) as s:
        rid = s.exec(select(KeyRotation.id).where(col(KeyRotation.device_id) == device)
                     .order_by(col(KeyRotation.id).desc())).first()
    return rotation_row(api.engine, rid) if rid is not None else None


def drive(api: Api, dev: FastDevice, rounds: int = 8) -> None:
    """What the publisher and the device's sampler do: every pending command delivered in
    seq order (the device answers each), then one batch, until nothing is pending."""
    for _ in range(rounds):
        for cmd in pending_commands(api, dev.id):
            asyncio.run(dev.on_command(cmd.signed))
        dev.sign_batch()
        asyncio.run(dev._client.publish("ce/v1/%s/up/readings" % dev.id,  # type: ignore[union-attr]
                                        dev.outbox.pop(0)))
        if not pending_commands(api, dev.id):
            return


def check_identity(api: Api, dev: FastDevice) -> None:
    """The current slot: a key, a certificate holding it, active at the fleet."""
    key = load_signer(dev._path(dev.slot, "key"))
    pem = dev._path(dev.slot, "crt").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert public_sec1(cert.public_key()) == public_sec1(key.public_key)  # type: ignore[arg-type]
    with Session(api.engine) as s:
        cred = s.exec(select(Credential).where(col(Credential.kid) == key.kid.hex())).one()
        assert cred.status == CredentialStatus.active
        assert cred.serial == "%x" % cert.serial_number


def start(api: Api, device: str) -> None:
    r = api.client.post("/devices/%s/rotate" % device, headers=api.headers(Role.security))
    assert r.status_code == 201, r.text


OPS = 11  # file operations of one rotation (measured by the run with no cut, below)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("cut", [None, *range(1, OPS + 1)])
def test_a_power_cut_at_any_write_of_a_rotation_leaves_a_working_identity(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int | None) -> None:
    enrolled = enroll_device(api, 1)
    d = tmp_path / "dev"
    chain_pem = str(enrolled.enrollment["chain_pem"])
    provision(d, device_id=enrolled.id, signer=enrolled.signer, chain_pem=chain_pem,
              ca_pem=chain_pem, fleet_keys=list(enrolled.enrollment["fleet_keys"]))  # type: ignore[call-overload]
    ing = Ingestor(api.engine, api.settings)
    dev = boot(d, ing)
    drive(api, dev)  # streaming: active
    start(api, dev.id)
    cutter = Cutter(monkeypatch, cut)
    try:
        drive(api, dev)
    except PowerCut:
        dev = boot(d, ing, dev)  # the cut: a new process from what is on disk
    if cut is None:
        assert cutter.n == OPS, "the rotation's file operations changed: update OPS"
    cutter.at = None
    check_identity(api, dev)
    statuses = dev._client.statuses  # type: ignore[union-attr]
    drive(api, dev)  # what was pending is delivered again (the device refuses what it took)
    assert dev._client.statuses[-1] == chain.OK  # type: ignore[union-attr]
    check_identity(api, dev)
    rot = latest_rotation(api, dev.id)
    assert rot is not None
    if rot.state != "old-revoked":  # the cut cost this rotation: a new one completes
        assert rot.state == "failed", (rot.state, rot.reason)
        start(api, dev.id)
        drive(api, dev)
        rot = latest_rotation(api, dev.id)
        assert rot is not None and rot.state == "old-revoked", (rot.state, rot.reason)
    check_identity(api, dev)
    assert set(dev.key_slots().values()) == {dev.signer.kid.hex()}  # the old key erased
    if cut is None:  # the uncut run went the whole way in one go
        assert dev.stats.commands == [rotation.ROTATE, rotation.INSTALL_CERT,
                                      rotation.ERASE_KEY]
        assert statuses.count(chain.OK) >= 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_tls_context_is_reused_until_a_rotation_replaces_the_key(
        api: Api, tmp_path: Path) -> None:
    """Every reconnect of a herd reuses the device's context; a rotation's switch, or a
    CA file written again, builds a new one from the files then on disk."""
    enrolled = enroll_device(api, 1)
    d = tmp_path / "dev"
    chain_pem = str(enrolled.enrollment["chain_pem"])
    provision(d, device_id=enrolled.id, signer=enrolled.signer, chain_pem=chain_pem,
              ca_pem=chain_pem, fleet_keys=list(enrolled.enrollment["fleet_keys"]))  # type: ignore[call-overload]
    dev = boot(d, Ingestor(api.engine, api.settings))
    drive(api, dev)
    first = dev.tls_context()
    assert dev.tls_context() is first
    old_slot = dev.slot
    start(api, dev.id)
    drive(api, dev)
    assert dev.slot != old_slot
    second = dev.tls_context()
    assert second is not first
    assert dev.tls_context() is second
    fastdevice.write_atomic(d / "ca.pem", (d / "ca.pem").read_bytes(), 0o644)
    assert dev.tls_context() is not second


def test_the_simulated_devices_reconnect_as_boards_and_gateways_do() -> None:
    """The simulator's reconnect backoff is the real devices' (a shorter one overloads a
    broker coming back harder than a real fleet would)."""
    from cityedge_fw import mqtt_async
    from cityedge_gateway import limits

    assert fastdevice.RECONNECT_MIN_S == mqtt_async._BACKOFF_MIN_MS / 1000 \
        == limits.MQTT_BACKOFF_MIN_S
    assert fastdevice.RECONNECT_MAX_S == mqtt_async._BACKOFF_MAX_MS / 1000 \
        == limits.MQTT_BACKOFF_MAX_S
