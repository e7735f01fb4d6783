"""The clustered broker (docs/BROKERS.md): three RabbitMQ nodes configured by
``broker_rabbitmq`` as ``cityedge broker config --engine rabbitmq`` writes them, fast
devices (real mTLS MQTT, signed batches) spread over the nodes, two ingest workers
consuming the quorum queue over AMQP (``ingest_amqp``) into the fleet's database.

One cluster for the module (a RabbitMQ node boots in ~10 s); the attacks run against the
same nodes: another device's topics, another CA, another device's client id. A missing
``rabbitmq-server`` fails here (``RabbitCluster``), never skips.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, func, select

from cityedge.fastdevice import FastDevice
from cityedge_core import topics
from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet.app import create_app
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_transport import ingest_worker
from cityedge_fleet.models import Reading, Role
from cityedge_fleet.serve import start_publisher

from support.fastfleet import DeviceLoop
from support.fleet import Api, device_body, wait_for
from support.fleet_ca import fleet_ca_from_pki
from support.mosquitto import Credentials, TestPKI
from support.rabbit_devices import MqttTry, enroll
from support.rabbitmq import RabbitCluster

DEVICES = 6  # two per node
# one more enrolled device, not run by the load test: a FastDevice keeps its chain's seq
# in memory only, so a device run again would send seqs stored already (duplicates)
SPARE = 1
COMMANDED = DEVICES + SPARE  # one more, run only by the command test (fresh seqs)
WAIT_S = 60.0


@pytest.fixture(scope="module")
def cluster_fleet() -> Iterator[SimpleNamespace]:
    world = Path(tempfile.mkdtemp(prefix="cityedge-cluster-"))
    world.chmod(0o755)
    pki = TestPKI(world / "pki")
    ca_dir = fleet_ca_from_pki(pki, world / "ca")
    ca = CertificateAuthority(ca_dir)
    ca.write_crl([], 86400)
    ingest = pki.service("fleet-ingest")
    settings = Settings(
        mode="development", database_url="sqlite:///%s" % (world / "fleet.sqlite3"),
        ca_dir=ca_dir, broker_engine="rabbitmq", mqtt_ca_file=pki.ca_pem,
        mqtt_cert_file=ingest.cert_pem, mqtt_key_file=ingest.key_pem,
        ingest_with_serve=False, commands_with_serve=False,
        audit_key_file=world / "audit.key", command_key_file=world / "command.key",
        limits=FleetLimits(ingest_group_max_s=0.05, enroll_burst=100_000))
    app = create_app(settings, init_db=True)
    ids = [str(device_body(i)["id"]) for i in range(COMMANDED + 1)]
    # the registry's devices are known before they enroll: the cluster boots meanwhile
    cluster = RabbitCluster(pki, [*ids, "fleet-ingest", "fleet-commands"],
                            directory=world / "rmq", crl_file=ca.crl_path)
    booting = ThreadPoolExecutor(1).submit(cluster.start)
    try:
        with TestClient(app) as client:
            api = Api(client, settings)
            devices = [enroll(api, world, pki, i) for i in range(COMMANDED + 1)]
            booting.result()
            settings = settings.model_copy(update={"ingest_amqp_nodes": ",".join(
                "127.0.0.1:%d" % n.amqp_port for n in cluster.nodes)})
            yield SimpleNamespace(api=api, world=world, pki=pki, ca=ca, cluster=cluster,
                                  devices=devices, settings=settings, engine=app.state.engine)
    finally:
        booting.exception()
        cluster.stop()
        app.state.engine.dispose()
        shutil.rmtree(world, ignore_errors=True)


def stored(engine: Any, device: str) -> tuple[int, int]:
    """(distinct batches stored, reading rows) for ``device``."""
    with Session(engine) as s:
        batches, rows = s.exec(select(func.count(func.distinct(Reading.batch_seq)),
                                      func.count()).where(
            col(Reading.device_id) == device)).one()
    return int(batches), int(rows)


def refused(workers: list[Any]) -> int:
    """Batches the ingest workers refused (a revoked device's)."""
    return sum(n for w in workers for status, n in w.ingestor.counts.items()
               if status == "not_accepting")


def test_a_node_killed_under_load_loses_no_acknowledged_batch(
        cluster_fleet: SimpleNamespace) -> None:
    """Two ingest workers share the quorum queue; node 1 (two devices on it, perhaps the
    queue's leader) is killed under load and restarted; a device on node 2 is revoked
    meanwhile. Every batch a device saw acknowledged is stored exactly once, every device
    of node 1 reconnects, the revoked one stays out."""
    f = cluster_fleet
    c: RabbitCluster = f.cluster
    workers = [ingest_worker(Ingestor(f.engine, f.settings), f.settings).start()
               for _ in range(2)]
    devices = [FastDevice(d, "127.0.0.1", c.nodes[i % 3].mqtt_port, interval_s=0.2)
               for i, (_, d) in enumerate(f.devices[:DEVICES])]
    revoked = devices[1]  # on node 2
    loop = DeviceLoop(devices).start()
    try:
        assert all(w.subscribed.wait(WAIT_S) for w in workers)
        assert wait_for(lambda: all(d.stats.published >= 3 for d in devices), WAIT_S), \
            [(d.stats.connects, d.stats.published, d.stats.last_error) for d in devices]
        c.kill(0)
        on_killed = [d for i, d in enumerate(devices) if i % 3 == 0]
        assert wait_for(lambda: all(d.stats.connect_failures >= 1 for d in on_killed), WAIT_S)
        r = f.api.client.post("/devices/%s/revoke" % revoked.id,
                              json={"reason": "key-compromise"},
                              headers=f.api.headers(Role.security))
        assert r.status_code == 200, r.text
        c.revoke(revoked.id)
        assert wait_for(lambda: revoked.stats.connect_failures >= 2, WAIT_S)
        revoked_published = revoked.stats.published
        # the node comes back (its service manager restarts it); the devices of the dead
        # node reconnect to it. (Sent to another node instead, they could not subscribe
        # again while it is down: RabbitMQ 3.10 keeps each MQTT subscription in a classic
        # queue on the node it was made on; docs/BROKERS.md)
        c.start_node(0)
        c.wait_listening(0)
        marks = {d.id: d.stats.published for d in on_killed}
        assert wait_for(lambda: all(d.stats.connects >= 2 and d.stats.published
                                    >= marks[d.id] + 3 for d in on_killed), WAIT_S), \
            [(d.stats.connects, d.stats.published, marks[d.id], d.stats.last_error)
             for d in on_killed]
    finally:
        loop.stop()
    try:
        # everything acknowledged by the cluster reaches the database: stored, or (the
        # revoked device's last ones, in the queue when the fleet revoked it) refused by
        # the ingest with a recorded verdict
        assert wait_for(lambda: all(stored(f.engine, d.id)[0] >= d.stats.published
                                    for d in devices if d is not revoked), WAIT_S), \
            [(d.id, d.stats.published, stored(f.engine, d.id)) for d in devices]
        # the revoked device's last batches (in the queue when the fleet revoked it) are
        # refused by the ingest, counted: stored or refused, none vanished
        assert wait_for(lambda: stored(f.engine, revoked.id)[0] + refused(workers)
                        >= revoked.stats.published, WAIT_S), \
            (revoked.stats.published, stored(f.engine, revoked.id),
             [w.ingestor.counts for w in workers])
    finally:
        for w in workers:
            w.stop()
    for d in devices:
        batches, rows = stored(f.engine, d.id)
        if d is not revoked:
            assert batches >= d.stats.published  # no acknowledged batch lost
        assert rows == batches * d.readings  # each stored once (duplicates classified)
    assert revoked.stats.published == revoked_published  # stayed out
    assert sum(w.groups for w in workers) > 0 and all(w.dead_letters == 0 for w in workers)


def test_a_device_cannot_publish_or_subscribe_to_another_devices_topics(
        cluster_fleet: SimpleNamespace) -> None:
    f = cluster_fleet
    c: RabbitCluster = f.cluster
    port = c.nodes[c.alive()].mqtt_port
    (a, a_dir), (b, _) = f.devices[2], f.devices[3]
    before = stored(f.engine, b)

    # subscribing to another device's commands, or to everyone's, is refused
    t = MqttTry(port, a_dir / "chain.pem", a_dir / "key.pem", f.pki.ca_pem, a)
    assert t.wait_connected()
    t.client.subscribe([(topics.down(b, topics.CMD), 1), ("ce/v1/+/down/cmd", 1),
                        ("ce/v1/#", 1), (topics.down(a, topics.CMD), 1)])
    assert t.subacked.wait(10) or t.gone.is_set()
    assert t.gone.is_set() or t.granted == [0x80, 0x80, 0x80, 1]
    t.close()

    # publishing into another device's topic: the broker refuses and drops the client
    t = MqttTry(port, a_dir / "chain.pem", a_dir / "key.pem", f.pki.ca_pem, a)
    assert t.wait_connected()
    info = t.client.publish(topics.up(b, topics.READINGS), b"forged", qos=1)
    assert t.gone.wait(10)
    assert info.mid not in t.acked
    t.close()
    assert stored(f.engine, b) == before

    # naming another identity with a password does not log in as it (no user has one)
    t = MqttTry(port, a_dir / "chain.pem", a_dir / "key.pem", f.pki.ca_pem, a,
                username="fleet-ingest", password="guess")
    assert not t.wait_connected()
    t.close()


def test_a_foreign_ca_certificate_is_refused_at_the_handshake(
        cluster_fleet: SimpleNamespace) -> None:
    f = cluster_fleet
    c: RabbitCluster = f.cluster
    device = f.devices[4][0]
    foreign = TestPKI(f.world / "foreign", "some other CA")
    fake: Credentials = foreign.issue_client(device)  # the right CN, the wrong issuer
    for node in range(3):
        if c.procs[node] is None or c.procs[node].poll() is not None:  # type: ignore[union-attr]
            continue
        t = MqttTry(c.nodes[node].mqtt_port, fake.cert_pem, fake.key_pem, f.pki.ca_pem,
                    device)
        assert not t.wait_connected()
        t.close()


NOT_AUTHORIZED = 0x87  # CONNACK 5 of MQTT 3.1.1, as paho reports it (MQTT 5's code)


def test_a_device_cannot_take_over_another_devices_client_id(
        cluster_fleet: SimpleNamespace) -> None:
    """Device B's valid certificate connects, to every node, with device A's client id
    while A streams batches through node 3: each CONNECT is refused "not authorized" by
    ``cityedge_mqtt_client_id`` before the MQTT plugin registers the id, so A keeps its
    one connection and its batches keep being acknowledged and stored. B's certificate
    with its own id twice shows what the check prevents: the plugin closes the older
    holder of an id, across nodes."""
    f = cluster_fleet
    c: RabbitCluster = f.cluster
    (a_id, a_dir), (b_id, b_dir) = f.devices[DEVICES], f.devices[4]  # A: the spare
    b_cert = (b_dir / "chain.pem", b_dir / "key.pem", f.pki.ca_pem)
    worker = ingest_worker(Ingestor(f.engine, f.settings), f.settings).start()
    a = FastDevice(a_dir, "127.0.0.1", c.nodes[2].mqtt_port, interval_s=0.2)
    loop = DeviceLoop([a]).start()
    try:
        assert worker.subscribed.wait(WAIT_S)
        assert wait_for(lambda: a.stats.published >= 3, WAIT_S), \
            (a.stats.connects, a.stats.published, a.stats.last_error)

        # the takeover the plugin does for a duplicate id: the newer connection wins
        first = MqttTry(c.nodes[1].mqtt_port, *b_cert, b_id)
        assert first.wait_connected()
        second = MqttTry(c.nodes[0].mqtt_port, *b_cert, b_id)
        assert second.wait_connected()
        assert first.gone.wait(WAIT_S)
        assert not second.gone.is_set()
        first.close()
        second.close()

        # the attack: B's certificate, A's client id, on every node
        connects, published = a.stats.connects, a.stats.published
        stored_before = stored(f.engine, a_id)[0]
        verdicts = []
        for node in range(3):
            t = MqttTry(c.nodes[node].mqtt_port, *b_cert, a_id)
            assert not t.wait_connected()
            verdicts.append(t.connack)
            t.close()
        assert verdicts == [NOT_AUTHORIZED] * 3
        # A was never disconnected and goes on: acknowledged, then stored
        assert wait_for(lambda: a.stats.published >= published + 5, WAIT_S), \
            (a.stats.connects, a.stats.published, a.stats.last_error)
        assert (a.stats.connects, a.stats.connect_failures) == (connects, 0)
        assert connects == 1
    finally:
        loop.stop()
    try:
        assert wait_for(lambda: stored(f.engine, a_id)[0]
                        >= stored_before + a.stats.published - published, WAIT_S), \
            (stored_before, a.stats.published, published, stored(f.engine, a_id))
    finally:
        worker.stop()
    # each node's check refused, and said so in its log (written a moment later)
    assert wait_for(lambda: all("cityedge: MQTT client id" in c.read_log(i)
                                for i in range(3)), WAIT_S)




def test_a_fleet_command_reaches_a_device_and_its_answer_is_recorded(
        cluster_fleet: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    """``fleet serve``'s command publisher as it wires it (``start_publisher``: the
    ``fleet-commands`` certificate, its CN as client id) on node 3, a fast device on node
    2 subscribed to its ``down/cmd``, the AMQP ingest waking the publisher as in ``fleet
    serve``: a ``status`` command queued through the API reaches the device (signed, the
    device's gate checks it), the device answers on ``up/result`` and the fleet records
    the answer, through the quorum queue.

    Then the device is away: MQTT 3.1.1 has no "no matching subscribers", so the
    cluster's PUBACK makes the next command ``sent`` though nobody got it. The device comes
    back at once (long before a silence: an hour here, as are the resends): its SUBSCRIBE
    is the cluster's ``binding.created`` event, which the ingest worker consumes, so the
    command is due again at once and answered (before the presence events it waited for
    the resend)."""
    f = cluster_fleet
    c: RabbitCluster = f.cluster
    commands = f.pki.service("fleet-commands")
    settings = f.settings.model_copy(update={
        "commands_with_serve": True, "commands_cert_file": commands.cert_pem,
        "commands_key_file": commands.key_pem, "mqtt_host": "127.0.0.1",
        "mqtt_port": c.nodes[2].mqtt_port, "limits": f.settings.limits.model_copy(update={
            "command_silence_s": 3600.0, "command_resend_s": 3600.0,
            "command_resend_max_s": 3600.0})})
    device_id, device_dir = f.devices[COMMANDED]
    publisher = start_publisher(settings, f.engine)
    assert publisher is not None
    worker = ingest_worker(Ingestor(f.engine, settings, on_return=publisher.wake),
                           settings).start()
    device = FastDevice(device_dir, "127.0.0.1", c.nodes[1].mqtt_port, interval_s=0.2)
    loop = DeviceLoop([device]).start()
    app = f.api.client.app
    app.state.command_publisher = publisher  # as `fleet serve` sets it: new ones wake it

    def queue_status() -> int:
        r = f.api.client.post("/devices/%s/commands" % device_id, json={"name": "status"},
                              headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def state(command_id: int) -> dict[str, Any]:
        return dict(f.api.client.get("/commands/%d" % command_id,
                                     headers=f.api.headers(Role.viewer)).json())

    try:
        assert worker.subscribed.wait(WAIT_S)
        # its first batch acknowledged: it subscribed to its down/cmd before
        assert wait_for(lambda: device.stats.published >= 1, WAIT_S), \
            (device.stats.connects, device.stats.last_error)
        assert publisher.connected.wait(WAIT_S), \
            "the command publisher is not connected: %s" % [
                r.getMessage() for r in caplog.records
                if r.name == "cityedge_fleet.command_publisher"]
        first = queue_status()
        assert wait_for(lambda: state(first)["state"] == "ok", WAIT_S), \
            (state(first), device.stats.commands, device.stats.forged, publisher.rounds)
        got = state(first)
        # sent at least once: on a loaded machine the device's first batch can also wake
        # the publisher (a return after a silence) before the answer is in
        assert got["sends"] >= 1 and got["result_detail"].startswith("seq ")
        assert device.stats.commands == ["status"]  # taken once, checked by its gate
        assert device.stats.forged == device.stats.refused == 0

        # the device goes away; a command queued meanwhile is acknowledged to nobody
        device.sampling = False
        loop.stop()
        away = queue_status()
        assert wait_for(lambda: state(away)["state"] == "sent", WAIT_S), state(away)
        assert state(away)["sends"] == 1
        assert device.stats.commands == ["status"]  # nothing reached it
        # back at once (its chain goes on): its subscription makes the command due
        device = FastDevice(device_dir, "127.0.0.1", c.nodes[1].mqtt_port, interval_s=0.2,
                            chain=(device.writer.seq, device.writer.head))
        loop = DeviceLoop([device]).start()
        assert wait_for(lambda: state(away)["state"] == "ok", WAIT_S), \
            (state(away), device.stats.commands, device.stats.published, publisher.rounds)
        assert state(away)["sends"] == 2  # the one to nobody, the one on its return
        assert worker.presence_due >= 1 and worker.presence_events >= 1
        assert device.stats.commands == ["status"]
        assert device.stats.forged == device.stats.refused == 0
    finally:
        app.state.command_publisher = None
        loop.stop()
        worker.stop()
        publisher.stop()


BAD_CREDENTIALS = 0x86  # CONNACK 4 of MQTT 3.1.1 (paho reports MQTT 5's code)


def test_a_node_without_the_client_id_check_refuses_every_login(tmp_path: Path) -> None:
    """A node whose ``ebin`` lost the compiled check (a node directory copied without it)
    fails closed: RabbitMQ turns the missing backend into a refused login, so a client id
    is never left unchecked. One node of its own (~30 s to boot)."""
    tmp_path.chmod(0o755)
    pki = TestPKI(tmp_path / "pki")
    device = "urn:dev:mac:nocheck01"
    creds = pki.issue_client(device)
    c = RabbitCluster(pki, [device], count=1, directory=tmp_path / "rmq")
    for d in c.node_dirs:
        (d / rmq.CODE_DIR / (rmq.CLIENT_ID_MODULE + ".beam")).unlink()
    try:
        c.start()
        t = MqttTry(c.nodes[0].mqtt_port, creds.cert_pem, creds.key_pem, pki.ca_pem, device)
        assert not t.wait_connected()  # its own CN as its id, and still refused
        t.close()
        assert t.connack == BAD_CREDENTIALS
    finally:
        c.stop()
