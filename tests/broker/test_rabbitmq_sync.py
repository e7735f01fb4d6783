"""The fleet drives the RabbitMQ cluster's grants itself (``broker_rabbitmq_sync``): a
device enrolled through the API is let in with no operator step, a revoked or quarantined
one is cut at once (user deleted, live connection closed, the CRL on every node), and the
reconciler mends drift (a stray device user, a grant gone missing).

One three-node cluster for the module (it boots in 30-120 s here), started with the
services' users only: every device user in it is the fleet's doing. The fleet reaches the
nodes with ``rabbitmqctl`` and the cluster's own Erlang cookie, as in production.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cityedge.fastdevice import FastDevice
from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet.app import create_app
from cityedge_fleet.broker_control import BrokerUnavailable
from cityedge_fleet.broker_rabbitmq_sync import (
    RabbitAccess,
    RabbitCtl,
    as_granted,
    check_cookie,
    user_definitions,
)
from cityedge_fleet.broker_sync import Reconciler
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_transport import ingest_worker
from cityedge_fleet.models import Role

from support.fastfleet import DeviceLoop
from support.fleet import Api, wait_for
from support.fleet_ca import fleet_ca_from_pki
from support.mosquitto import TestPKI
from support.rabbit_devices import MqttTry, enroll
from support.rabbitmq import RABBIT_BIN, RabbitCluster

WAIT_S = 60.0


@pytest.fixture(scope="module")
def synced() -> Iterator[SimpleNamespace]:
    world = Path(tempfile.mkdtemp(prefix="cityedge-rmqsync-"))
    world.chmod(0o755)
    pki = TestPKI(world / "pki")
    ca_dir = fleet_ca_from_pki(pki, world / "ca")
    ca = CertificateAuthority(ca_dir)
    ca.write_crl([], 86400)
    cluster = RabbitCluster(pki, ["fleet-ingest", "fleet-commands"], directory=world / "rmq",
                            crl_file=ca.crl_path)
    ingest = pki.service("fleet-ingest")
    settings = Settings(
        mode="development", database_url="sqlite:///%s" % (world / "fleet.sqlite3"),
        ca_dir=ca_dir, broker_engine="rabbitmq", mqtt_ca_file=pki.ca_pem,
        mqtt_cert_file=ingest.cert_pem, mqtt_key_file=ingest.key_pem,
        broker_rabbitmq_nodes=",".join(n.name for n in cluster.nodes),
        broker_rabbitmq_home=cluster.home, broker_rabbitmq_ctl=RABBIT_BIN / "rabbitmqctl",
        broker_rabbitmq_epmd_port=cluster.epmd_port,
        ingest_amqp_nodes=",".join("127.0.0.1:%d" % n.amqp_port for n in cluster.nodes),
        ingest_with_serve=False, commands_with_serve=False,
        audit_key_file=world / "audit.key", command_key_file=world / "command.key",
        limits=FleetLimits(ingest_group_max_s=0.05, enroll_burst=100_000))
    app = create_app(settings, init_db=True)
    try:
        cluster.start()
        access = app.state.broker_access
        assert isinstance(access, RabbitAccess) and access.enabled
        with TestClient(app) as client:
            yield SimpleNamespace(api=Api(client, settings), world=world, pki=pki, ca=ca,
                                  cluster=cluster, settings=settings, access=access,
                                  engine=app.state.engine)
    finally:
        cluster.stop()
        app.state.engine.dispose()
        shutil.rmtree(world, ignore_errors=True)


def device_users(f: SimpleNamespace) -> set[str]:
    return {cn for cn in f.access.clients() if cn.startswith("urn:dev:")}


def connect(f: SimpleNamespace, node: int, device: str, d: Path) -> MqttTry:
    return MqttTry(f.cluster.nodes[node].mqtt_port, d / "chain.pem", d / "key.pem",
                   f.pki.ca_pem, device)


def crl_on_nodes(f: SimpleNamespace) -> bytes:
    """The CRL file the nodes read (the test cluster's nodes share one directory)."""
    crl_dir = f.cluster.dir / "conf" / rmq.CRL_DIR
    return b"".join((crl_dir / name).read_bytes()
                    for name, _ in rmq.crl_hash_files(f.ca.crl_path))


def test_an_enrolled_device_connects_and_publishes_with_no_manual_step(
        synced: SimpleNamespace) -> None:
    f = synced
    assert device_users(f) == set()  # the cluster knew no device before
    device, d = enroll(f.api, f.world, f.pki, 1)
    assert device_users(f) == {device}
    granted = f.access.definitions()
    # its own topic permissions only, no password, no tags
    user = next(u for u in granted["users"] if u["name"] == device)
    assert user["password_set"] is False and user["tags"] == []
    assert "password_hash" not in user  # no hash leaves the node, even an empty one
    topic = [p for p in granted["topic_permissions"] if p["user"] == device]
    assert [(p["write"], p["read"]) for p in topic] == [as_granted(device).topic]

    worker = ingest_worker(Ingestor(f.engine, f.settings), f.settings).start()
    fast = FastDevice(d, "127.0.0.1", f.cluster.nodes[2].mqtt_port, interval_s=0.2)
    loop = DeviceLoop([fast]).start()
    try:
        assert worker.subscribed.wait(WAIT_S)
        assert wait_for(lambda: fast.stats.published >= 3, WAIT_S), \
            (fast.stats.connects, fast.stats.connect_failures, fast.stats.last_error)
        assert wait_for(lambda: worker.ingestor.counts.get("ok", 0) >= 3, WAIT_S), \
            worker.ingestor.counts
    finally:
        loop.stop()
        worker.stop()


def test_a_revoked_device_is_cut_at_once_and_cannot_reconnect(
        synced: SimpleNamespace) -> None:
    """The attack: a device whose key leaked keeps its live session, or reconnects. Both
    are refused from the revoke call's return: its user is gone, its connection closed,
    and every node's CRL names its certificate."""
    f = synced
    device, d = enroll(f.api, f.world, f.pki, 2)
    live = connect(f, 1, device, d)
    assert live.wait_connected()
    start = time.monotonic()
    r = f.api.client.post("/devices/%s/revoke" % device, json={"reason": "key-compromise"},
                          headers=f.api.headers(Role.security))
    answered = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert r.json()["broker_cut"] is True
    assert live.gone.wait(WAIT_S)
    closed = time.monotonic() - start
    live.close()
    again = [connect(f, node, device, d) for node in range(3)]
    assert not any(t.wait_connected() for t in again)
    refused = time.monotonic() - start
    for t in again:
        t.close()
    assert device not in device_users(f)
    assert crl_on_nodes(f) == f.ca.crl_path.read_bytes()
    assert f.ca.crl_serials() and len(f.ca.crl_serials() or ()) == 1
    print("\nrevoke: API answered %.2f s, live connection closed %.2f s, reconnect to 3 "
          "nodes refused %.2f s after the command" % (answered, closed, refused))


def test_a_quarantined_device_is_cut_at_once(synced: SimpleNamespace) -> None:
    f = synced
    device, d = enroll(f.api, f.world, f.pki, 3)
    live = connect(f, 0, device, d)
    assert live.wait_connected()
    start = time.monotonic()
    r = f.api.client.post("/devices/%s/state" % device,
                          json={"state": "quarantined", "reason": "odd readings"},
                          headers=f.api.headers(Role.security))
    assert r.status_code == 200, r.text
    assert live.gone.wait(WAIT_S)
    closed = time.monotonic() - start
    live.close()
    again = connect(f, 2, device, d)
    assert not again.wait_connected()
    again.close()
    assert device not in device_users(f)
    print("\nquarantine: live connection closed %.2f s after the command" % closed)


def test_the_reconciler_removes_a_stray_user_and_restores_a_missing_grant(
        synced: SimpleNamespace) -> None:
    """The attack: a device user the registry does not know (left by hand, or by a fleet
    that died between its calls) lets a certificate with that CN in; the reconciler's
    round takes it out, and gives back a grant someone deleted."""
    f = synced
    c: RabbitCluster = f.cluster
    device, d = enroll(f.api, f.world, f.pki, 4)
    stray = "urn:dev:mac:00deadbeef0001"
    stray_cert = f.pki.issue_client(stray)  # a valid certificate, not on the CRL
    c.ctl("import_definitions", "--format", "json",
          stdin=json.dumps(user_definitions(stray)))
    c.ctl("delete_user", device)
    t = MqttTry(c.nodes[1].mqtt_port, stray_cert.cert_pem, stray_cert.key_pem, f.pki.ca_pem,
                stray)
    assert t.wait_connected()  # the stray user works: this is the hole
    reconciler = Reconciler(f.access, lambda: Session(f.engine), 3600)
    done = reconciler.round()
    assert stray in done.cut and device in done.granted
    assert t.gone.wait(WAIT_S)  # its live connection closed too
    t.close()
    t = MqttTry(c.nodes[0].mqtt_port, stray_cert.cert_pem, stray_cert.key_pem, f.pki.ca_pem,
                stray)
    assert not t.wait_connected()
    t.close()
    assert stray not in device_users(f) and device in device_users(f)
    back = connect(f, 2, device, d)
    assert back.wait_connected()
    back.close()
    # a second round finds nothing to do
    done = reconciler.round()
    assert done.granted == [] and done.cut == []


def test_a_node_that_does_not_answer_is_passed_over(synced: SimpleNamespace) -> None:
    f = synced
    ctl = f.access.ctl
    assert isinstance(ctl, RabbitCtl)
    over = RabbitCtl(["gone@localhost", *ctl.nodes], ctl=ctl.ctl, home=ctl.home,
                     epmd_port=ctl.epmd_port, timeout_s=ctl.timeout_s)
    assert "fleet-ingest" in over.run("list_users")
    nobody = RabbitCtl(["gone@localhost"], ctl=ctl.ctl, home=ctl.home,
                       epmd_port=ctl.epmd_port, timeout_s=ctl.timeout_s)
    with pytest.raises(BrokerUnavailable):
        nobody.run("list_users")


def test_the_fleet_refuses_a_cookie_others_can_read(tmp_path: Path) -> None:
    (tmp_path / ".erlang.cookie").write_text("secret")
    (tmp_path / ".erlang.cookie").chmod(0o440)
    with pytest.raises(ValueError, match="0400"):
        check_cookie(tmp_path)
    (tmp_path / ".erlang.cookie").chmod(0o400)
    check_cookie(tmp_path)
    with pytest.raises(ValueError, match="cookie"):
        check_cookie(tmp_path / "elsewhere")


def test_production_on_rabbitmq_needs_the_nodes_and_the_cookie_not_a_control_cert(
        tmp_path: Path) -> None:
    base = dict(mode="production", broker_engine="rabbitmq")
    with pytest.raises(ValueError) as e:
        Settings(**base)  # type: ignore[arg-type]
    assert "CITYEDGE_BROKER_RABBITMQ_NODES" in str(e.value)
    assert "CITYEDGE_BROKER_RABBITMQ_HOME" in str(e.value)
    assert "CITYEDGE_BROKER_CONTROL_CERT_FILE" not in str(e.value)
    with pytest.raises(ValueError) as e:
        Settings(mode="production")
    assert "CITYEDGE_BROKER_CONTROL_CERT_FILE" in str(e.value)
    assert "CITYEDGE_BROKER_RABBITMQ_NODES" not in str(e.value)
