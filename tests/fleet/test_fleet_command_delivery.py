"""Fleet commands through a real Mosquitto (TLS, client certificates, the production rules)
and the real fleet on SQLite and PostgreSQL: the publisher (``fleet-commands``) delivers a
queued command to the device's subscription, knows when the device is not there, sends it
again after the device reconnects and stops once the device's result is in; a stand-in
device (the real ``CommandGate`` on CPython, with the keys enrollment handed it) checks
what it gets and answers with a result signed by its key, which the real ingest verifies
and records; a device that was away gets its command as soon as its first batch shows it
is back; a stolen device cannot command another."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import MQTTProtocolVersion
from sqlalchemy import create_engine

from cityedge_core import command, topics
from cityedge_core.command_gate import CommandRefused
from cityedge_fleet.app import create_app
from cityedge_fleet.command_publisher import CommandPublisher
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker
from cityedge_fleet.models import Role, utcnow
from cityedge_host.crypto import EcSigner

from support.commands import device_gate
from support.fleet import Api, EnrolledDevice, csr_for, device_body, wait_for
from support.fleet_world import fleet_world
from support.mosquitto import Mosquitto, TestPKI
from support.mqtt_probe import WAIT_S, Probe

NOT_AUTHORIZED = 135


class Fleet(SimpleNamespace):
    api: Api
    broker: Mosquitto
    settings: Settings
    world: Path


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    w = fleet_world(pki, db_url, "cityedge-cmd-")
    world, broker, settings = w.dir, w.broker, w.settings
    app = create_app(settings, init_db=True)
    try:
        with TestClient(app) as client:
            yield Fleet(api=Api(client, settings), broker=broker, settings=settings,
                        world=world)
    finally:
        app.state.broker_access.close()
        app.state.engine.dispose()
        broker.cleanup()
        shutil.rmtree(world, ignore_errors=True)


def enroll(f: Fleet, i: int) -> tuple[EnrolledDevice, SimpleNamespace]:
    """Register and enroll device ``i`` (granted at the broker by enrollment): the device
    and its certificate files."""
    from cityedge_core import batch as batchmod

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
    dev_id = str(body["id"])
    dev = EnrolledDevice(dev_id, signer, batchmod.BatchWriter(dev_id, signer, signer.kid),
                         r.json())
    return dev, SimpleNamespace(cert_pem=d / "chain.pem", key_pem=d / "key.pem")


def connect(f: Fleet, creds: SimpleNamespace, device: str) -> Probe:
    """The device's session as the firmware opens it: clean, subscribed to its down/cmd."""
    probe = Probe(f.broker, creds)  # type: ignore[arg-type]
    assert probe.subscribe(topics.down(device, topics.CMD))
    return probe


def send(f: Fleet, device: str, name: str = "status", **body: Any) -> dict[str, Any]:
    r = f.api.client.post("/devices/%s/commands" % device, json={"name": name, **body},
                          headers=f.api.headers(Role.security))
    assert r.status_code == 201, r.text
    return dict(r.json())


def command_state(f: Fleet, command_id: int) -> dict[str, Any]:
    return dict(f.api.client.get("/commands/%d" % command_id,
                                 headers=f.api.headers(Role.viewer)).json())


def publisher_for(f: Fleet, **limits: Any) -> CommandPublisher:
    lim = f.settings.limits.model_copy(update=limits)
    return CommandPublisher(f.api.engine, f.settings.model_copy(update={"limits": lim}),
                            rand=lambda: 0.5)  # no jitter: the waits are the limits


def ingest_worker(f: Fleet, publisher: CommandPublisher | None = None) -> MqttIngestWorker:
    worker = MqttIngestWorker(Ingestor(f.api.engine, f.settings, on_return=(
        publisher.wake if publisher is not None else None)), f.settings).start()
    assert worker.subscribed.wait(WAIT_S)
    return worker


def test_delivered_again_after_a_reconnect_and_never_after_the_result(fleet: Fleet) -> None:
    f = fleet
    dev, creds = enroll(f, 1)
    device = connect(f, creds, dev.id)
    cmd = send(f, dev.id, args={"n": 1})
    publisher = publisher_for(f).open()
    worker = ingest_worker(f)
    try:
        assert publisher.connected.wait(WAIT_S)
        lim = f.settings.limits
        t0 = utcnow()
        first = publisher.round(now=t0)
        assert first.delivered == [cmd["id"]]
        device.wait_for(lambda: len(device.messages) == 1, "the command")
        sent = command_state(f, cmd["id"])
        assert (sent["state"], sent["attempts"], sent["sends"]) == ("sent", 1, 1)
        # not due again before its resend time: a round sends nothing
        assert publisher.round(now=t0 + dt.timedelta(seconds=1)).tried == 0
        device.leave(f.broker, dev.id)  # the device is gone before it could answer
        t1 = t0 + dt.timedelta(seconds=lim.command_resend_s + 1)
        away = publisher.round(now=t1)
        assert away.absent == [cmd["id"]]  # the broker had no subscriber: it knows
        got = command_state(f, cmd["id"])
        assert (got["state"], got["attempts"], got["sends"]) == ("sent", 2, 1)
        device = connect(f, creds, dev.id)  # back, as the firmware reconnects
        t2 = t1 + dt.timedelta(seconds=lim.command_absent_retry_s + 1)
        assert publisher.round(now=t2).delivered == [cmd["id"]]
        device.wait_for(lambda: len(device.messages) == 1, "the command again")
        topic, again = device.messages[0]
        assert topic == topics.down(dev.id, topics.CMD)
        gate = device_gate(dev.id, dev.enrollment["fleet_keys"])  # type: ignore[arg-type]
        name, seq, args = gate.check(again)
        assert (name, seq, args) == ("status", 1, {"n": 1})
        result = command.encode_result(dev.signer, dev.signer.kid, name, dev.id, seq,
                                       command.OK, "status sent")
        assert device.publish(topics.up(dev.id, topics.RESULT), result) < 0x80
        assert wait_for(lambda: command_state(f, cmd["id"])["state"] == "ok", WAIT_S)
        done = command_state(f, cmd["id"])
        assert (done["attempts"], done["sends"], done["result_detail"]) == (3, 2,
                                                                            "status sent")
        # answered: no round sends it again, however late
        later = t2 + dt.timedelta(seconds=lim.command_resend_max_s * 4)
        assert publisher.round(now=later).tried == 0
        assert len(device.messages) == 1
    finally:
        device.close()
        worker.stop()
        publisher.close()


def test_a_stand_in_device_obeys_and_answers_end_to_end(fleet: Fleet) -> None:
    """The publisher and the ingest run as in ``fleet serve``; the device checks each
    command with its real gate and answers each, refusing what its gate refuses."""
    f = fleet
    dev, creds = enroll(f, 2)
    device = connect(f, creds, dev.id)
    publisher = publisher_for(f, command_poll_s=0.2).start()
    worker = ingest_worker(f, publisher)
    gate = device_gate(dev.id, dev.enrollment["fleet_keys"])  # type: ignore[arg-type]
    answered: list[bytes] = []

    def obey(data: bytes) -> None:
        try:
            name, seq, _args = gate.check(data)
            outcome, detail = command.OK, "did %s" % name
        except CommandRefused as e:  # a replay: the stand-in does not re-answer yet
            assert "replay" in str(e)
            return
        result = command.encode_result(dev.signer, dev.signer.kid, name, dev.id, seq,
                                       outcome, detail, {"seq": seq})
        assert device.publish(topics.up(dev.id, topics.RESULT), result) < 0x80
        answered.append(data)

    try:
        ids = [send(f, dev.id)["id"],
               send(f, dev.id, "desired", args={"sample_interval_s": 30})["id"]]
        seen = 0
        while len(answered) < 2:
            device.wait_for(lambda n=seen: len(device.messages) > n, "a command")
            obey(device.messages[seen][1])
            seen += 1
        assert wait_for(lambda: all(command_state(f, i)["state"] == "ok" for i in ids),
                        WAIT_S)
        states = [command_state(f, i) for i in ids]
        assert [(s["seq"], s["result_detail"], s["result_data"]) for s in states] == [
            (1, "did status", {"seq": 1}), (2, "did desired", {"seq": 2})]
        assert gate.state.get("cmd_seq") == 2
    finally:
        device.close()
        worker.stop()
        publisher.stop()


def test_a_device_away_gets_its_command_as_soon_as_it_is_back(fleet: Fleet) -> None:
    """The only way the command can arrive in time is the ingest's word that the device is
    back: the publisher's own retry of an absent device is an hour away."""
    f = fleet
    dev, creds = enroll(f, 3)
    publisher = publisher_for(f, command_poll_s=0.2, command_absent_retry_s=3600.0,
                              command_silence_s=1.0).start()
    worker = ingest_worker(f, publisher)
    try:
        cmd = send(f, dev.id)
        assert wait_for(lambda: command_state(f, cmd["id"])["attempts"] == 1, WAIT_S)
        assert command_state(f, cmd["id"])["state"] == "queued"  # tried, nobody there
        device = connect(f, creds, dev.id)
        assert device.publish(dev.topic, dev.sign(1)) < 0x80  # its first batch
        device.wait_for(lambda: len(device.messages) == 1, "the command, at once")
        # the publisher records the delivery once the broker's PUBACK is in, which may be
        # a moment after the device has the command
        assert wait_for(lambda: command_state(f, cmd["id"])["state"] == "sent", WAIT_S)
        device.close()
    finally:
        worker.stop()
        publisher.stop()


def test_a_stolen_device_cannot_command_another(fleet: Fleet) -> None:
    """It may not publish on another device's (or its own) down/ topics, and a command it
    signs with its own key, or copies from another device, is refused by the gate."""
    f = fleet
    victim, victim_creds = enroll(f, 4)
    thief, thief_creds = enroll(f, 5)
    listening = connect(f, victim_creds, victim.id)
    stolen = connect(f, thief_creds, thief.id)
    try:
        forged = command.encode_command(thief.signer, thief.signer.kid, "status", victim.id,
                                        1, 2**32)
        for target in (victim.id, thief.id):
            assert stolen.publish(topics.down(target, topics.CMD), forged) == NOT_AUTHORIZED
        gate = device_gate(victim.id, victim.enrollment["fleet_keys"])  # type: ignore[arg-type]
        from cityedge_core.errors import UnknownKeyError

        with pytest.raises(UnknownKeyError):
            gate.check(forged)
        own = send(f, thief.id)  # a genuine command of the thief's, replayed to the victim
        publisher = publisher_for(f).open()
        try:
            assert publisher.connected.wait(WAIT_S)
            assert publisher.round().delivered == [own["id"]]
        finally:
            publisher.close()
        stolen.wait_for(lambda: len(stolen.messages) == 1, "its own command")
        with pytest.raises(CommandRefused, match="not this device"):
            gate.check(stolen.messages[0][1])
        assert listening.messages == []
    finally:
        listening.close()
        stolen.close()


def test_fleet_serve_runs_the_publisher_when_it_has_its_certificate(fleet: Fleet) -> None:
    from cityedge_fleet import serve

    f = fleet
    publisher = serve.start_publisher(f.settings, f.api.engine)
    assert publisher is not None
    try:
        assert publisher.connected.wait(WAIT_S)
        ingest = serve.ingestor_for(f.settings, f.api.engine, SimpleNamespace(  # type: ignore[arg-type]
            wake=lambda: None), publisher)
        assert ingest.on_return == publisher.wake
    finally:
        publisher.stop()
    assert serve.start_publisher(f.settings.model_copy(update={"commands_cert_file": None}),
                                 f.api.engine) is None
    assert serve.start_publisher(f.settings.model_copy(update={"commands_with_serve": False}),
                                 f.api.engine) is None


def test_the_publisher_identity_can_only_send_commands(fleet: Fleet, pki: TestPKI) -> None:
    """A compromised publisher host holds the fleet-commands certificate: it may publish
    on devices' down/ topics and nothing else (and what it publishes is not signed by the
    command key, which devices need)."""
    f = fleet
    dev, _creds = enroll(f, 6)
    publisher = Probe(f.broker, pki.service("fleet-commands"))
    try:
        assert publisher.publish(topics.down(dev.id, topics.CMD), b"x") < 0x80
        assert publisher.publish(topics.down(dev.id, topics.DESIRED), b"x") < 0x80
        for topic in (topics.up(dev.id, topics.READINGS), topics.up(dev.id, topics.RESULT),
                      "$CONTROL/dynamic-security/v1"):
            assert publisher.publish(topic, b"x") == NOT_AUTHORIZED, topic
        for topic in ("ce/v1/#", topics.up(dev.id, topics.RESULT), topics.down(dev.id, "+")):
            assert not publisher.subscribe(topic), topic
    finally:
        publisher.close()


@pytest.mark.parametrize(("engine", "protocol"), [("mosquitto", MQTTProtocolVersion.MQTTv5),
                                                   ("rabbitmq", MQTTProtocolVersion.MQTTv311)])
def test_the_publisher_names_itself_by_its_cn_and_speaks_the_engines_mqtt(
        pki: TestPKI, tmp_path: Path, engine: str, protocol: MQTTProtocolVersion) -> None:
    """Its client id is its certificate's CN (a replica's ``fleet-commands-2`` too: the
    cluster refuses another id); MQTT 5 where the PUBACK tells an absent device, 3.1.1 on
    RabbitMQ 3.10 (which cannot parse an MQTT 5 CONNECT:
    tests/broker/test_rabbitmq_cluster.py delivers through it)."""
    replica = pki.issue_client("fleet-commands-2")
    settings = Settings(mode="development", database_url="sqlite://", broker_engine=engine,
                        mqtt_ca_file=pki.ca_pem, commands_cert_file=replica.cert_pem,
                        commands_key_file=replica.key_pem)
    publisher = CommandPublisher(create_engine("sqlite://"), settings)
    assert (publisher.client_id, publisher.protocol) == ("fleet-commands-2", protocol)
    not_a_cert = tmp_path / "not-a-cert.pem"
    not_a_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="CITYEDGE_COMMANDS_CERT_FILE"):
        CommandPublisher(create_engine("sqlite://"), settings.model_copy(
            update={"commands_cert_file": not_a_cert}))
