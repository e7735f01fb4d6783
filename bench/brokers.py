"""Broker throughput at QoS 1 (docs/BROKERS.md): the same publishers through single-node
Mosquitto, a three-node RabbitMQ cluster (MQTT plugin, messages into the fleet's quorum
queue) and a three-node NATS cluster (MQTT on JetStream), all on loopback with TLS and
client certificates, in one run.

Each publisher is a paho client (MQTT 3.1.1, TLS, its own certificate) with up to
``INFLIGHT`` unacknowledged PUBLISHes; the rate is PUBACKs per second over all publishers,
from the first PUBLISH to the last PUBACK. Publishers are spread over the cluster's nodes.
Payloads are ``PAYLOAD_BYTES`` (about one signed batch of ten readings).

``python -m bench.brokers`` prints the table.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PAYLOAD_BYTES = 600
INFLIGHT = 100
PUBLISHERS = 6
MESSAGES = 3000  # per publisher


def _support() -> None:
    p = Path(__file__).resolve().parent.parent / "tests"
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _publish(port: int, creds: Any, ca: Path, client_id: str, topic: str, n: int,
             done: list[float], ready: threading.Barrier) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    acked = threading.Event()
    count = [0]

    def on_publish(*_a: Any) -> None:
        count[0] += 1
        if count[0] == n:
            acked.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
    c.tls_set_context(ctx)
    c.max_inflight_messages_set(INFLIGHT)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    payload = os.urandom(PAYLOAD_BYTES)
    ready.wait(60)
    for _ in range(n):
        c.publish(topic, payload, qos=1)
    acked.wait(300)
    done.append(time.monotonic())
    c.disconnect()
    c.loop_stop()


def _run(ports: list[int], pki: Any, ids: list[str], topic_of: Any) -> float:
    done: list[float] = []
    ready = threading.Barrier(len(ids) + 1)
    threads = [threading.Thread(target=_publish, args=(
        ports[i % len(ports)], pki.issue_client(cn), pki.ca_pem, cn, topic_of(cn), MESSAGES,
        done, ready), daemon=True) for i, cn in enumerate(ids)]
    for t in threads:
        t.start()
    ready.wait(60)
    t0 = time.monotonic()
    for t in threads:
        t.join(600)
    if len(done) != len(ids):
        raise RuntimeError("publishers did not finish")
    return len(ids) * MESSAGES / (max(done) - t0)


def _nats_cluster(work: Path, pki: Any, users: list[str]) -> tuple[list[subprocess.Popen[bytes]],
                                                                    list[int]]:
    from cityedge_host.ports import free_port

    n = 3
    client = [free_port() for _ in range(n)]
    route = [free_port() for _ in range(n)]
    mqtt_ports = [free_port() for _ in range(n)]
    user_lines = ",\n".join('    {user: "CN=%s"}' % u for u in users)
    procs = []
    for i in range(n):
        d = work / ("nats%d" % i)
        d.mkdir(parents=True, exist_ok=True)
        routes = ", ".join("nats-route://127.0.0.1:%d" % route[j] for j in range(n) if j != i)
        conf = d / "nats.conf"
        conf.write_text("""server_name: n%d
listen: 127.0.0.1:%d
jetstream { store_dir: "%s" }
cluster { name: ce, listen: 127.0.0.1:%d, routes: [%s] }
authorization { users: [
%s
] }
mqtt {
  listen: 127.0.0.1:%d
  tls { cert_file: "%s", key_file: "%s", ca_file: "%s", verify_and_map: true, timeout: 5 }
  stream_replicas: 3
}
""" % (i + 1, client[i], d / "js", route[i], routes, user_lines, mqtt_ports[i],
            pki.server.cert_pem, pki.server.key_pem, pki.ca_pem))
        procs.append(subprocess.Popen(["nats-server", "-c", str(conf)],
                                      stdout=(d / "log").open("wb"),
                                      stderr=subprocess.STDOUT))
    return procs, mqtt_ports


def _wait_mqtt(port: int, pki: Any, cn: str, timeout_s: float = 60.0) -> None:
    """Until a client with ``cn``'s certificate connects (a JetStream cluster needs a
    leader before MQTT sessions work)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    creds = pki.issue_client(cn)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ok = threading.Event()

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any,
                       ok: threading.Event = ok) -> None:
            if not rc.is_failure:
                ok.set()

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cn + "-probe",
                        protocol=mqtt.MQTTv311)
        ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
        c.tls_set_context(ctx)
        c.on_connect = on_connect
        try:
            c.connect("127.0.0.1", port, keepalive=10)
            c.loop_start()
            if ok.wait(3):
                c.disconnect()
                c.loop_stop()
                return
            c.loop_stop()
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("NATS MQTT on port %d did not take a client" % port)


def run() -> dict[str, float]:
    """msgs/s at QoS 1 for each engine (one run, same publishers and payloads)."""
    _support()
    from cityedge_core import topics

    from support.mosquitto import Mosquitto, TestPKI
    from support.rabbitmq import RabbitCluster

    work = Path(tempfile.mkdtemp(prefix="cityedge-bench-brokers-"))
    work.chmod(0o755)
    pki = TestPKI(work / "pki")
    ids = ["urn:dev:mac:bench%04d" % i for i in range(PUBLISHERS)]

    def up(cn: str) -> str:
        return topics.up(cn, topics.READINGS)

    out: dict[str, float] = {}

    mosq = Mosquitto(pki).start()
    try:
        mosq.grant(*ids)
        # no subscriber here: Mosquitto acknowledges without storing anything (its ingest
        # session would hold them in memory); the clusters below store each one
        out["mosquitto, 1 node"] = _run([mosq.port], pki, ids, up)
    finally:
        mosq.cleanup()

    cluster = RabbitCluster(pki, ids, directory=work / "rmq").start()
    try:
        out["rabbitmq 3.10, 3 nodes (quorum queue)"] = _run(
            [n.mqtt_port for n in cluster.nodes], pki, ids, up)
    finally:
        cluster.stop()

    procs, ports = _nats_cluster(work, pki, [*ids, *("%s-probe" % i for i in ids)])
    try:
        for i, p in enumerate(ports):
            _wait_mqtt(p, pki, ids[i])
        out["nats 2.9, 3 nodes (MQTT on JetStream R3)"] = _run(ports, pki, ids, up)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    return out


def report(rates: dict[str, float]) -> None:
    print("\nBrokers, QoS 1 over TLS, %d publishers x %d messages of %d bytes (docs/BROKERS.md):"
          % (PUBLISHERS, MESSAGES, PAYLOAD_BYTES))
    for name, rate in rates.items():
        print("  %-45s %8.0f msgs/s" % (name, rate))


if __name__ == "__main__":
    report(run())
