"""End to end through a real Mosquitto (TLS, client certificates, the production rules) into
SQLite and PostgreSQL: one device publishes poison batches (signed SenML the database
could not store), another relays a captured batch of a device that is not its node, and
one batch hits a row the database refuses (a trigger); good devices and a gateway with its
node publish beside them. Every good reading is stored, the poison is recorded, the refused
row is a dead letter, and every message is acknowledged: a worker started afterwards on
the same persistent session is redelivered nothing."""

from __future__ import annotations

from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from sqlmodel import Session, select

from cityedge_core import chain, senml
from cityedge_fleet import ingest
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker
from cityedge_fleet.models import IngestDeadLetter, IngestEvent, Reading

from support.fleet import POISON, T0, Api, enroll_device, refuse_rows, wait_for
from support.mosquitto import Mosquitto, TestPKI

pytestmark = pytest.mark.timeout(240)


class Publisher:
    """A device's MQTT connection: its own client certificate (CN = device id)."""

    def __init__(self, pki: TestPKI, broker: Mosquitto, device: str) -> None:
        creds = pki.issue_client(device)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(pki.ca_pem), certfile=str(creds.cert_pem),
                            keyfile=str(creds.key_pem))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.sent = 0

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), topic  # the broker took it (PUBACK)
        self.sent += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ingest_settings(api: Api, pki: TestPKI, mosquitto: Mosquitto) -> Settings:
    creds = pki.issue_client("fleet-ingest")
    return api.settings.model_copy(update={
        "mqtt_ca_file": pki.ca_pem, "mqtt_cert_file": creds.cert_pem,
        "mqtt_key_file": creds.key_pem, "mqtt_port": mosquitto.port,
        "mqtt_client_id": "fleet-ingest-hostile",
        "limits": FleetLimits(ingest_attempts=2, ingest_retry_s=0.01,
                              ingest_group_max_messages=8, ingest_group_max_s=0.05)})


@pytest.fixture
def workers(api: Api, ingest_settings: Settings) -> Iterator[list[MqttIngestWorker]]:
    started: list[MqttIngestWorker] = []
    yield started
    for w in started:
        w.stop()


def _start(api: Api, settings: Settings, started: list[MqttIngestWorker]) -> MqttIngestWorker:
    worker = MqttIngestWorker(Ingestor(api.engine, settings), settings).start()
    started.append(worker)
    assert worker.subscribed.wait(20)
    return worker


def test_hostile_publishers_through_the_broker_delay_nobody(
        api: Api, pki: TestPKI, mosquitto: Mosquitto, ingest_settings: Settings,
        workers: list[MqttIngestWorker]) -> None:
    a, b, poisoner, thief, gw = (enroll_device(api, i) for i in range(1, 6))
    node = enroll_device(api, 6, gateway=gw.id)
    refuse_rows(api.engine, "reading", "NEW.name = 'boom'")
    worker = _start(api, ingest_settings, workers)
    mosquitto.grant(*(d.id for d in (a, b, poisoner, thief, gw)))  # what enrollment does
    pubs = {d.id: Publisher(pki, mosquitto, d.id) for d in (a, b, poisoner, thief, gw)}
    kinds = ["bignum", "nul-in-vs", "nan", "value-overflow", "unit-over-column"]
    try:
        for i, kind in enumerate(kinds):
            a_batch = a.sign(2)
            pubs[a.id].publish(a.topic, a_batch)
            pubs[poisoner.id].publish(poisoner.topic,
                                      poisoner.writer.sign(POISON[kind], boot=1))
            pubs[thief.id].publish("ce/v1/%s/up/relay" % thief.id, a_batch)  # captured
            pubs[b.id].publish(b.topic, b.sign(2))
            if i == 2:
                pubs[poisoner.id].publish(poisoner.topic, poisoner.writer.sign(
                    [{senml.BT: T0, senml.N: "boom", senml.V: 1}], boot=1))
                pubs[gw.id].publish("ce/v1/%s/up/relay" % gw.id, node.sign(3))
        total = sum(p.sent for p in pubs.values())

        def decided() -> int:
            return sum(worker.ingestor.counts.values()) + worker.dead_letters

        assert wait_for(lambda: decided() == total, timeout=60), (
            decided(), total, worker.ingestor.counts)
    finally:
        for p in pubs.values():
            p.close()
    counts = worker.ingestor.counts
    assert counts == {chain.OK: 2 * len(kinds) + 1, chain.MALFORMED: len(kinds),
                      ingest.NOT_RELAY_GATEWAY: len(kinds)}, counts
    assert worker.dead_letters == 1 and worker.database_down == 0
    with Session(api.engine) as s:
        stored = sorted((r.device_id, r.batch_seq, r.status, r.via)
                        for r in s.exec(select(Reading)))
        letter = s.exec(select(IngestDeadLetter)).one()
        malformed = s.exec(select(IngestEvent).where(
            IngestEvent.status == chain.MALFORMED)).all()
    want = sorted([(d.id, seq, "ok", None) for d in (a, b) for seq in range(1, 6)] * 2
                  + [(node.id, 1, "ok", gw.id)] * 3)
    assert stored == want
    assert letter.publisher == poisoner.id and "refused by the test" in letter.error
    assert {e.device_id for e in malformed} == {poisoner.id}

    # every message was acknowledged: the same session, resumed, brings nothing back
    worker.stop()
    workers.remove(worker)
    again = _start(api, ingest_settings, workers)
    marker = Publisher(pki, mosquitto, a.id)
    try:
        marker.publish(a.topic, a.sign(1))
        assert wait_for(lambda: sum(again.ingestor.counts.values()) >= 1, timeout=30)
    finally:
        marker.close()
    assert again.ingestor.counts == {chain.OK: 1} and again.dead_letters == 0
