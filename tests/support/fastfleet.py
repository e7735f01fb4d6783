"""A real fleet (API on SQLite or PostgreSQL, ingest worker, command publisher) in front of
a real Mosquitto (TLS, client certificates, the fleet's CRL, dynamic security), and fast
CPython devices (``cityedge.fastdevice``) run in an asyncio loop of their own thread."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlmodel import Session

from cityedge.fastdevice import FastDevice, provision
from cityedge_core.chain import ChainState
from cityedge_fleet import command_key
from cityedge_fleet.app import create_app
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.command_publisher import CommandPublisher
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker
from cityedge_fleet.models import ChainStateRow, Credential, Device, DeviceState, Role
from cityedge_host.crypto import EcSigner, public_sec1

from support.fleet import Api, csr_for, device_body
from support.fleet_world import fleet_world
from support.mosquitto import Mosquitto, TestPKI
from support.mqtt_probe import WAIT_S, Probe


class Fleet(SimpleNamespace):
    api: Api
    broker: Mosquitto
    settings: Settings
    world: Path
    pki: TestPKI
    worker: MqttIngestWorker
    publisher: CommandPublisher


@contextlib.contextmanager
def real_fleet(db_url: str, pki: TestPKI, **limits: Any) -> Iterator[Fleet]:
    w = fleet_world(pki, db_url, "cityedge-rot-", **{
        "command_poll_s": 0.2, "ingest_group_max_s": 0.05, "enroll_burst": 100_000, **limits})
    world, broker, settings = w.dir, w.broker, w.settings
    app = create_app(settings, init_db=True)
    worker = publisher = None
    try:
        with TestClient(app) as client:
            publisher = CommandPublisher(app.state.engine, settings, rand=lambda: 0.5).start()
            app.state.command_publisher = publisher
            worker = MqttIngestWorker(Ingestor(app.state.engine, settings,
                                               on_return=publisher.wake), settings).start()
            assert worker.subscribed.wait(WAIT_S)
            assert publisher.connected.wait(WAIT_S)
            yield Fleet(api=Api(client, settings), broker=broker, settings=settings,
                        world=world, pki=pki, worker=worker, publisher=publisher)
    finally:
        if worker is not None:
            worker.stop()
        if publisher is not None:
            publisher.stop()
        app.state.broker_access.close()
        app.state.engine.dispose()
        broker.cleanup()
        shutil.rmtree(world, ignore_errors=True)


def enroll_through_api(f: Fleet, i: int) -> tuple[dict[str, Any], EcSigner, dict[str, Any]]:
    """Register device ``i`` and enroll it through the API as a technician and the device
    would (granted at the broker by the enrollment): its registry body, its first key and
    the enrollment's answer."""
    body = device_body(i)
    tech = f.api.headers(Role.technician)
    assert f.api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = f.api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                              headers=tech).json()["token"]
    signer = EcSigner.generate()
    r = f.api.client.post("/enroll", json={"serial": body["serial"], "token": token,
                                           "csr_pem": csr_for(signer, str(body["id"]))})
    assert r.status_code == 200, r.text
    return body, signer, dict(r.json())


def keep_first(directory: Path, signer: EcSigner, chain_pem: str) -> Path:
    """A copy of a device's first key and chain (``<directory>/first``), to try them after
    they are revoked (``refused_at_the_broker``)."""
    first = directory / "first"
    first.mkdir()
    (first / "key.pem").write_bytes(signer.private_pem())
    (first / "chain.pem").write_text(chain_pem)
    return first


def refused_at_the_broker(f: Fleet, first: Path) -> bool:
    """Whether the broker refuses a connection with the key and chain kept in ``first``."""
    creds = SimpleNamespace(cert_pem=first / "chain.pem", key_pem=first / "key.pem")
    try:
        probe = Probe(f.broker, creds)  # type: ignore[arg-type]
    except ConnectionRefusedError:
        return True
    probe.close()
    return False


def enroll_fast(f: Fleet, i: int, interval_s: float = 0.2) -> tuple[FastDevice, Path]:
    """Register and enroll device ``i`` through the API (``enroll_through_api``) and
    provision a fast device with it (the fleet's root certificate, and the answer's trust
    statement installed); also returns a copy of its first key and chain
    (``keep_first``)."""
    body, signer, enrolled = enroll_through_api(f, i)
    d = f.world / ("dev%d" % i)
    provision(d, device_id=str(body["id"]), signer=signer, chain_pem=enrolled["chain_pem"],
              ca_pem=f.pki.ca_pem.read_text(), fleet_keys=enrolled["fleet_keys"],
              root_pem=(f.api.settings.ca_dir / "root.crt").read_text(),
              statement=enrolled.get("trust_statement"))
    first = keep_first(d, signer, enrolled["chain_pem"])
    return FastDevice(d, "127.0.0.1", f.broker.port, interval_s=interval_s), first


class DeviceLoop:
    """Fast devices running in an asyncio loop on a thread of their own."""

    def __init__(self, devices: list[FastDevice]) -> None:
        self.devices = devices
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(d.run() for d in self.devices))

        try:
            self.loop.run_until_complete(main())
        except BaseException as e:  # reported by stop()
            self.error = e

    def start(self) -> DeviceLoop:
        self.thread.start()
        return self

    def call(self, fn: Any) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        for d in self.devices:
            self.loop.call_soon_threadsafe(d.stop)
        self.thread.join(30)
        assert not self.thread.is_alive(), "fast devices did not stop"
        if self.error is not None:
            raise self.error


GRANTS_PER_REQUEST = 10  # identities granted per broker control request (bulk)


def register_fast_many(f: Fleet, first: int, n: int, *, not_before: dt.datetime,
                       state: DeviceState = DeviceState.provisioned,
                       base: Path | None = None) -> list[Path]:
    """Devices ``first`` .. ``first + n - 1`` (``device_body``'s ids, site ``harbour``)
    straight into the registry as enrollment leaves them (``state``, a credential of a
    certificate the fleet's CA signed for a key made here, the chain's row), granted at
    the broker (``BrokerAccess.grant_many``), and a fast device's directory each under
    ``base`` (default: the world's; ``provision``, with a copy of its first key and chain
    in ``<dir>/first`` as ``enroll_fast`` keeps); their directories. The credential rows
    say the key was issued at ``not_before`` (a campaign over old keys); the certificates
    are fresh. For campaigns over a thousand devices, where enrolling each through the
    API is not what is measured (``enroll_fast`` does that)."""
    ca = CertificateAuthority(f.settings.ca_dir)
    fleet_keys = command_key.trust_store(command_key.from_settings(f.settings))
    access = f.api.client.app.state.broker_access  # type: ignore[attr-defined]
    root_pem = (f.settings.ca_dir / "root.crt").read_text()
    ca_pem = f.pki.ca_pem.read_text()
    chain_tail = ca.chain_pem()
    base = base or f.world
    dirs = []
    for start in range(first, first + n, GRANTS_PER_REQUEST):
        ids = []
        with Session(f.api.engine) as s:
            for i in range(start, min(first + n, start + GRANTS_PER_REQUEST)):
                body = device_body(i)
                dev = str(body["id"])
                signer = EcSigner.generate()
                cert = ca.sign_csr(csr_for(signer, dev), dev,
                                   days=f.settings.limits.cert_validity_days)
                cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
                s.add(Device(id=dev, serial=str(body["serial"]), model=str(body["model"]),
                             hardware_class=str(body["hardware_class"]),
                             site=str(body["site"]), state=state))
                s.flush()
                s.add(Credential(device_id=dev, serial="%x" % cert.serial_number,
                                 kid=signer.kid.hex(), public_key=public_sec1(
                                     signer.public_key).hex(), not_before=not_before,
                                 not_after=cert.not_valid_after_utc, cert_pem=cert_pem,
                                 issuer=ca.id))
                s.add(ChainStateRow(device_id=dev, state=ChainState().to_bytes(),
                                    last_seq=0))
                d = provision(base / ("dev%d" % i), device_id=dev, signer=signer,
                              chain_pem=cert_pem + chain_tail, ca_pem=ca_pem,
                              fleet_keys=fleet_keys, root_pem=root_pem)
                (d / "first").mkdir()
                (d / "first" / "key.pem").write_bytes(signer.private_pem())
                (d / "first" / "chain.pem").write_text(cert_pem + chain_tail)
                dirs.append(d)
                ids.append(dev)
            access.grant_many(ids)  # before the commit, as enrollment grants
            s.commit()
    return dirs
