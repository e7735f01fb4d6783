"""Nodes publish to the site's local Mosquitto; the gateway verifies, stores and only then
acknowledges (a failed store means redelivery, not loss); forged and replayed are refused."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiomqtt

from cityedge_core import batch, senml
from cityedge_fleet.broker_acl import Acl
from cityedge_gateway.config import BrokerConfig
from cityedge_gateway.node_link import NodeListener
from cityedge_gateway.relay import NodeRelay
from cityedge_gateway.store import Store
from cityedge_host.crypto import EcSigner

from support.mosquitto import Mosquitto, TestPKI

GW = "urn:dev:mac:b827ebfffe123456"
NODE = "urn:dev:mac:0024befffe804ff1"


def _recs(k: int) -> list[dict[int, object]]:
    return [{senml.N: "t", senml.U: "Cel", senml.V: k, senml.T: 1.7e9 + k}]


def test_node_batches_via_local_broker(tmp_path: Path, pki: TestPKI) -> None:
    # the site's own broker: nodes as devices, the gateway reads every node's batches
    broker = Mosquitto(pki, clients=[NODE]).grant_custom(GW, [
        Acl("subscribeLiteral", "ce/v1/+/up/readings"),
        Acl("publishClientReceive", "ce/v1/+/up/readings")])
    broker.start()
    gw = pki.issue_client(GW)
    node_creds = pki.issue_client(NODE)
    cfg = BrokerConfig("127.0.0.1", broker.port, pki.ca_pem, gw.cert_pem, gw.key_pem, 5, 16)
    node_key, mallory = EcSigner.generate(), EcSigner.generate()
    store = Store(tmp_path / "b.sqlite", 10**7)
    relay = NodeRelay({NODE: node_key.verifier()}, store)
    listener = NodeListener(cfg, GW, relay, lambda: None)
    w = batch.BatchWriter(NODE, node_key, node_key.kid)
    good = [w.sign(_recs(k), 1) for k in range(6)]
    forged = batch.BatchWriter(NODE, mallory, node_key.kid, w.seq, w.head).sign(_recs(9), 1)
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    ctx.load_cert_chain(str(node_creds.cert_pem), str(node_creds.key_pem))
    topic = "ce/v1/%s/up/readings" % NODE

    async def until(cond: object) -> None:
        async with asyncio.timeout(15):
            while not cond():  # type: ignore[operator]
                await asyncio.sleep(0.02)

    async def scenario() -> None:
        task = asyncio.create_task(listener.run())
        await until(lambda: listener.connected)
        # 1. storage fails: nothing may be acknowledged, so the broker must redeliver.
        store._db.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'full'); END"
        )
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx) as node:
            for data in good[:3]:
                await node.publish(topic, data, qos=1)
            await until(lambda: not listener.connected)  # the listener dropped the link
            store._db.execute("DROP TRIGGER boom")
            await until(lambda: store.depth() == 3)  # redelivered after the reconnect
            for data in [*good[3:], forged, good[1]]:  # forged, then seq 2 again
                await node.publish(topic, data, qos=1)
            await until(lambda: sum(relay.stats[NODE].failures.values()) == 1)
            await until(lambda: store.depth() == 6)
        task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        broker.cleanup()
    assert [r.data for r in store.oldest(10)] == good  # byte-identical, in order
    stats = relay.stats[NODE]
    assert stats.failures == {"bad_signature": 1}
    assert stats.duplicates == 1  # good[1] again: a recognised redelivery, stored once
