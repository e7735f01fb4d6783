"""The fleet rotates the Pi gateway's key while it streams, end to end over the real parts:
Mosquitto with mTLS, the dynamic security plugin and the fleet's own CRL; the fleet on
SQLite (API, CA, command publisher, ingest worker as ``fleet serve`` runs them); the
gateway service as ``cityedge gateway run`` builds it from a TOML with ``identity_dir``,
enrolled through the fleet's ``/enroll`` and streaming its own readings.

Checked: the rotation goes ``sent`` to ``old-revoked``; every batch the gateway signed is
stored by the ingest as ``ok`` (none lost, none refused across the switch); the batches on
the wire form one chain whose first batch under the new key links to the last under the
old; the broker refuses the old certificate afterwards; no file on disk holds the old
key. And a forged, another device's, an expired and a replayed ``rotate`` make no CSR."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_core import batch, cbor, chain, command, command_decode, cose, topics
from cityedge_fleet import rotation_ingest
from cityedge_fleet.models import IngestEvent, Reading, Role
from cityedge_gateway.readings import Reading as GwReading
from cityedge_gateway.status import status_map
from cityedge_host.crypto import EcSigner, load_signer

from support.fleet import Api, wait_for
from support.fleet_world import fleet_world
from support.gateway import GW
from support.gateway_enroll import enroll_gateway as support_enroll
from support.gateway_run import RunningGateway
from support.mosquitto import OBSERVER, TestPKI
from support.mqtt_probe import WAIT_S, Probe
from support.rotation import command_row, rotation_row

ROTATION_WAIT_S = 60.0  # seconds the whole rotation may take on a busy machine


@pytest.fixture
def world(pki: TestPKI) -> Iterator[SimpleNamespace]:
    from fastapi.testclient import TestClient

    from cityedge_fleet.app import create_app

    w = fleet_world(pki, None, "cityedge-gwrot-", command_poll_s=0.2, command_resend_s=1.0,
                    command_absent_retry_s=0.5)
    d, broker, settings = w.dir, w.broker, w.settings
    app = create_app(settings, init_db=True)
    try:
        with TestClient(app) as client:
            yield SimpleNamespace(api=Api(client, settings), broker=broker, settings=settings,
                                  dir=d, pki=pki)
    finally:
        app.state.broker_access.close()
        app.state.engine.dispose()
        broker.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def enroll_gateway(w: SimpleNamespace) -> tuple[Path, EcSigner]:
    """Register and enroll the gateway as a technician does; write its config. Returns
    the config path and the enrolled (old) key."""
    config, old, _ = support_enroll(w.api, w.dir / "gw", 900, w.broker.port, w.pki.ca_pem,
                                    'identity_dir = "identity"\nbatch_readings = 5\n'
                                    "batch_max_age_s = 0.2")
    return config, old


class Stream:
    """Readings into the running gateway, a few every 50 ms, from a thread (each handed
    to the gateway's own loop)."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            n = self.sent
            self.gw._loop.call_soon_threadsafe(
                self.gw.gw.add_readings, [GwReading("t", "Cel", float(n))], time.time())
            self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def rotation_state(api: Api) -> str:
    rows = api.client.get("/devices/%s/rotations" % GW,
                          headers=api.headers(Role.viewer)).json()
    return str(rows[0]["state"]) if rows else ""


def wire_batches(watcher: Probe) -> list[tuple[bytes, dict[int, Any], bytes]]:
    """(kid, payload, signed bytes) of the gateway's batches on the wire, first copy of
    each seq (a batch whose PUBACK was lost is sent again, byte for byte)."""
    out: dict[int, tuple[bytes, dict[int, Any], bytes]] = {}
    for t, p in list(watcher.messages):
        if t == topics.up(GW, topics.READINGS):
            kid, _prot, payload, _sig = cose.split_sign1(p, 1 << 20)
            body = cbor.loads(payload)
            out.setdefault(body[batch.F_SEQ], (kid, body, p))
    return [out[s] for s in sorted(out)]


def test_the_fleet_rotates_the_streaming_gateway_without_losing_a_batch(
        world: SimpleNamespace) -> None:
    w = world
    config, old = enroll_gateway(w)
    watcher = Probe(w.broker, w.pki.service(OBSERVER))
    assert watcher.subscribe("ce/v1/%s/up/#" % GW)  # the PUBACK on down/ is the gateway's
    from cityedge_fleet.command_publisher import CommandPublisher
    from cityedge_fleet.ingest import Ingestor
    from cityedge_fleet.ingest_mqtt import MqttIngestWorker

    publisher = CommandPublisher(w.api.engine, w.settings, rand=lambda: 0.5).start()
    worker = MqttIngestWorker(Ingestor(w.api.engine, w.settings, on_return=publisher.wake),
                              w.settings).start()
    assert worker.subscribed.wait(WAIT_S)
    gw = RunningGateway(config)
    stream = Stream(gw)
    try:
        assert not (config.parent / "gateway.key").exists()  # moved into slot 0
        assert gw.gw.signer.kid == old.kid
        # streaming under the old key, seen by the fleet
        assert wait_for(lambda: len(wire_batches(watcher)) >= 3, WAIT_S)
        r = w.api.client.post("/devices/%s/rotate" % GW, headers=w.api.headers(Role.security))
        assert r.status_code == 201, r.text
        assert wait_for(lambda: rotation_state(w.api) in ("old-revoked", "failed"),
                        ROTATION_WAIT_S), rotation_state(w.api)
        assert rotation_state(w.api) == "old-revoked"
        new_kid = gw.gw.signer.kid
        assert new_kid != old.kid
        assert status_map(gw.gw)["identity"] == {"kid": new_kid.hex(), "slot": 1,
                                                  "switches": 1}
        # the rotate command replayed (as a broker could): the kept answer, no second CSR
        link = Probe(w.broker, w.pki.service("fleet-commands"))
        try:
            rotate_cmd = command_row(w.api.engine, r.json()["rotate_command_id"]).signed
            first = [p for t, p in watcher.messages if t == topics.up(GW, topics.RESULT)]
            assert link.publish(topics.down(GW, topics.CMD), rotate_cmd) == 0
            watcher.wait_for(lambda: len([1 for t, _p in watcher.messages
                                          if t == topics.up(GW, topics.RESULT)])
                             > len(first), "the replay's answer")
            again_ = [p for t, p in watcher.messages if t == topics.up(GW, topics.RESULT)]
            assert again_[-1] == first[0]  # rotate's answer, byte for byte
        finally:
            link.close()
        n_before = len(wire_batches(watcher))
        assert wait_for(lambda: len(wire_batches(watcher)) >= n_before + 3, WAIT_S)
    finally:
        stream.stop()
        gw.stop()  # commits what is pending; the next start sends it
    again = RunningGateway(config)  # restarted: comes back with the new identity
    try:
        assert status_map(again.gw)["identity"] == {"kid": new_kid.hex(), "slot": 1,
                                                     "switches": 0}
        assert wait_for(lambda: again.gw.store.depth() == 0, WAIT_S)  # all delivered
        last_seq = again.gw.store.writer.seq  # type: ignore[union-attr]
    finally:
        again.stop()
    try:
        # every batch the gateway signed was stored as ok, under the old key or the new
        def stored() -> set[int]:
            with Session(w.api.engine) as s:
                return set(s.exec(select(Reading.batch_seq).where(
                    col(Reading.device_id) == GW)).all())
        assert wait_for(lambda: stored() == set(range(1, last_seq + 1)), WAIT_S), (
            sorted(set(range(1, last_seq + 1)) - stored()))
        with Session(w.api.engine) as s:
            statuses = set(s.exec(select(Reading.status).where(
                col(Reading.device_id) == GW)).all())
            events = [e.status for e in s.exec(select(IngestEvent).where(
                col(IngestEvent.device_id) == GW))]
        assert statuses == {"ok"}
        # no refusal, no gap, no fork: the CSR taken, and maybe a batch whose PUBACK the
        # reconnect cut short, sent again and recognised (counted, not stored twice)
        assert events.count(rotation_ingest.CSR_TAKEN) == 1
        assert set(events) <= {rotation_ingest.CSR_TAKEN, chain.DUPLICATE}, events
        # one chain on the wire: each batch links to the one before; the key changes once
        wire = wire_batches(watcher)
        assert [b[batch.F_SEQ] for _k, b, _p in wire] == list(range(1, last_seq + 1))
        for (_k0, _b0, prev_bytes), (_k1, b1, _p1) in itertools.pairwise(wire):
            assert b1[batch.F_PREV] == batch.batch_hash(prev_bytes)
        kids = [k for k, _b, _p in wire]
        switch = kids.index(new_kid)
        assert set(kids[:switch]) == {old.kid} and set(kids[switch:]) == {new_kid}
        # no file of the gateway holds the old key any more
        pem = old.private_pem()
        assert [p for p in (w.dir / "gw").rglob("*") if p.is_file()
                and pem in p.read_bytes()] == []
        # and the broker refuses the old certificate now (the fleet's CRL lists it)
        old_key = w.dir / "old.key"
        old_key.write_bytes(pem)
        old_creds = SimpleNamespace(cert_pem=config.parent / "gateway.crt", key_pem=old_key)
        with pytest.raises(ConnectionRefusedError):
            Probe(w.broker, old_creds)  # type: ignore[arg-type]
        # one CSR in all, proven by the old key
        csrs = [p for t, p in watcher.messages if t == topics.up(GW, topics.CSR)]
        assert len(csrs) == 1
    finally:
        watcher.close()
        worker.stop()
        publisher.stop()


def test_forged_foreign_expired_and_replayed_rotate_commands_make_no_csr(
        world: SimpleNamespace) -> None:
    w = world
    config, _old = enroll_gateway(w)
    fleet_key = load_signer(w.settings.command_key_file)
    watcher = Probe(w.broker, w.pki.service(OBSERVER))
    assert watcher.subscribe("ce/v1/%s/up/#" % GW)  # the PUBACK on down/ is the gateway's
    link = Probe(w.broker, w.pki.service("fleet-commands"))
    gw = RunningGateway(config)
    results = topics.up(GW, topics.RESULT)

    def answers() -> list[bytes]:
        return [p for t, p in watcher.messages if t == results]

    def deliver(data: bytes) -> None:
        for _ in range(200):
            if link.publish(topics.down(GW, topics.CMD), data) == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the gateway never subscribed to its down/cmd")

    def rotate(signer: EcSigner, seq: int, target: str = GW, ttl_s: int = 600) -> bytes:
        return command.encode_command(signer, signer.kid, "rotate", target, seq,
                                      int(time.time()) + ttl_s, {1: 77})

    try:
        rogue = EcSigner.generate()
        deliver(rotate(rogue, 1))  # forged: not the fleet's key
        deliver(rotate(fleet_key, 1, target="urn:dev:mac:0024befffe800001"))  # another's
        deliver(rotate(fleet_key, 1, ttl_s=-5))  # expired
        watcher.wait_for(lambda: len(answers()) == 1, "the expired one's refusal")
        expired = command_decode.decode_result(answers()[0], gw.gw.signer.verifier())
        assert (expired.name, expired.outcome) == ("rotate", command.REFUSED)
        assert "expired" in expired.detail
        # a status at seq 1 is taken; the same bytes again are a replay: the kept answer
        status = command.encode_command(fleet_key, fleet_key.kid, "status", GW, 1,
                                        int(time.time()) + 600)
        deliver(status)
        watcher.wait_for(lambda: len(answers()) == 2, "the status answer")
        deliver(status)
        watcher.wait_for(lambda: len(answers()) == 3, "the repeated answer")
        assert answers()[2] == answers()[1]
        # a genuine rotate whose seq was taken by that status: replayed, never run
        deliver(rotate(fleet_key, 1))
        watcher.wait_for(lambda: len(answers()) == 4, "the replay's answer")
        stats = gw.gw.responder.stats  # type: ignore[union-attr]
        assert (stats.rejected, stats.foreign, stats.accepted) == (1, 1, 1)
        assert [t for t, _p in watcher.messages if t == topics.up(GW, topics.CSR)] == []
        assert gw.gw.slots.pending() is None  # type: ignore[union-attr]  # no key made
    finally:
        gw.stop()
        link.close()
        watcher.close()


def test_a_gateway_stopped_before_answering_install_cert_comes_back_rotated(
        world: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process stops after the pointer moved and before the answer went out: it boots
    with the new key, whose first batch proves the rotation (it runs to old-revoked); the
    fleet's re-sent install-cert is answered ``failed`` (no answer was kept for it), a late
    answer that changes nothing."""
    w = world
    config, old = enroll_gateway(w)
    from cityedge_fleet.command_publisher import CommandPublisher
    from cityedge_fleet.ingest import Ingestor
    from cityedge_fleet.ingest_mqtt import MqttIngestWorker
    from cityedge_gateway import rotation_device

    installed = threading.Event()
    real = rotation_device.GatewayRotation.install_cert

    async def stops_before_answering(self: Any, args: Any) -> Any:
        await real(self, args)
        installed.set()
        await asyncio.Event().wait()  # the power goes before the answer is signed

    publisher = CommandPublisher(w.api.engine, w.settings, rand=lambda: 0.5).start()
    worker = MqttIngestWorker(Ingestor(w.api.engine, w.settings, on_return=publisher.wake),
                              w.settings).start()
    assert worker.subscribed.wait(WAIT_S)
    try:
        with monkeypatch.context() as m:
            m.setattr(rotation_device.GatewayRotation, "install_cert", stops_before_answering)
            gw = RunningGateway(config)
            stream = Stream(gw)
            try:
                def streaming() -> bool:  # the first batch stored makes the gateway active
                    with Session(w.api.engine) as s:
                        return s.exec(select(Reading).where(
                            col(Reading.device_id) == GW)).first() is not None
                assert wait_for(streaming, WAIT_S)
                r = w.api.client.post("/devices/%s/rotate" % GW,
                                      headers=w.api.headers(Role.security))
                assert r.status_code == 201, r.text
                assert installed.wait(ROTATION_WAIT_S)
            finally:
                stream.stop()
                gw.stop()
        assert gw.gw.signer.kid == old.kid  # never switched in that process
        again = RunningGateway(config)
        stream = Stream(again)
        try:
            new_kid = again.gw.signer.kid
            assert new_kid != old.kid and again.gw.identity.slot == 1  # type: ignore[union-attr]
            assert wait_for(lambda: rotation_state(w.api) == "old-revoked", ROTATION_WAIT_S), (
                rotation_state(w.api))
            # the re-sent install-cert: taken before the stop, never answered
            rid = r.json()["id"]
            assert wait_for(lambda: command_row(w.api.engine, rotation_row(
                w.api.engine, rid).install_command_id).state != "sent", ROTATION_WAIT_S)
        finally:
            stream.stop()
            again.stop()
        rot = w.api.client.get("/devices/%s/rotations" % GW,
                               headers=w.api.headers(Role.viewer)).json()[0]
        assert rot["new_kid"] == new_kid.hex()
        install = command_row(w.api.engine, rot["install_command_id"])
        # no answer was kept for it: "interrupted" while its seq is the last taken, the
        # responder's "answered long ago" once erase-key's seq came after it
        assert install.state == "failed" and install.result_detail.startswith(
            ("interrupted", "answered long ago")), install.result_detail
        assert rot["state"] == "old-revoked"  # a late answer changes nothing
        pem = old.private_pem()
        assert [p for p in (w.dir / "gw").rglob("*") if p.is_file()
                and pem in p.read_bytes()] == []
    finally:
        worker.stop()
        publisher.stop()
