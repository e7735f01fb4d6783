"""Forwarding through a real TLS Mosquitto: broker restart and a link outage while data
flows; afterwards every batch has arrived, chains unbroken, and the buffer is empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message

from cityedge_core import batch, chain
from cityedge_gateway.config import BrokerConfig
from cityedge_gateway.forwarder import Forwarder
from cityedge_gateway.relay import NodeRelay
from cityedge_gateway.store import Store
from cityedge_host.crypto import EcSigner

from support.gateway import GW, NODE, recs, subscriber
from support.mosquitto import Mosquitto, TestPKI


def test_restart_and_outage_deliver_everything(tmp_path: Path, pki: TestPKI) -> None:
    broker = Mosquitto(pki, persistence=True, extra="max_queued_messages 100000",
                       clients=[GW]).start()
    gw_creds = pki.issue_client(GW)
    gw_creds.key_pem.chmod(0o600)
    cfg = BrokerConfig("127.0.0.1", broker.port, pki.ca_pem, gw_creds.cert_pem, gw_creds.key_pem,
                       keepalive_s=5, inflight=32)  # fmt: skip
    signer, node_key = EcSigner.generate(), EcSigner.generate()
    store = Store(tmp_path / "b.sqlite", 10**8)
    store.attach_writer(GW, signer, signer.kid)
    relay = NodeRelay({NODE: node_key.verifier()}, store)
    node_writer = batch.BatchWriter(NODE, node_key, node_key.kid)
    got: list[tuple[str, bytes]] = []
    rounds = 3 * 40

    async def produce(k: int) -> None:
        d = relay.check(NODE, node_writer.sign(recs(3, k), 1))
        relay.commit([d])
        store.commit(own=[recs(50, k)] * 4)
        fwd.notify()
        await asyncio.sleep(0.005)

    async def scenario() -> None:
        up = asyncio.Event()
        sub = asyncio.create_task(subscriber(pki, broker.port, got, up))
        await asyncio.wait_for(up.wait(), 10)
        fwd_task = asyncio.create_task(fwd.run())
        for k in range(40):
            await produce(k)
        await asyncio.to_thread(broker.restart)  # broker restart while data flows
        for k in range(40, 80):
            await produce(k)
        await asyncio.to_thread(broker.stop)  # link outage: everything is buffered
        for k in range(80, rounds):
            await produce(k)
        assert store.depth() >= 40 * 5
        await asyncio.to_thread(broker.start)
        async with asyncio.timeout(60):
            while store.depth() or len({p for _, p in got}) < rounds * 5:
                await asyncio.sleep(0.05)
        fwd_task.cancel()
        sub.cancel()

    fwd = Forwarder(cfg, GW, store)
    try:
        asyncio.run(scenario())
    finally:
        broker.cleanup()
    assert fwd.stats.connects >= 2 and fwd.stats.connect_failures >= 1
    own = [p for t, p in got if t == "ce/v1/%s/up/readings" % GW]
    relayed = [p for t, p in got if t == "ce/v1/%s/up/relay" % GW]
    keyring = {
        signer.kid: chain.KeyEntry(GW, signer.verifier()),
        node_key.kid: chain.KeyEntry(NODE, node_key.verifier()),
    }
    v = chain.BatchVerifier(keyring)
    # Oldest first: each chain arrives in order; redeliveries are recognised duplicates.
    # The broker also redelivers to this watcher what it had in flight to it at the
    # restart (up to this broker's 100 in flight, more than the chain's 64 remembered
    # hashes): such a copy is classed a replay, and must be one of the payloads already
    # received, byte for byte (at-least-once), never a batch the forwarder sent twice out
    # of order.
    seen: set[bytes] = set()
    statuses = []
    for p in own + relayed:
        status = v.check(p).status
        if status == "replay":
            assert p in seen, "a replay verdict for a batch never received before"
            status = "duplicate"
        seen.add(p)
        statuses.append(status)
    assert set(statuses) <= {"ok", "duplicate"}, statuses
    assert v.states[GW].last_seq == rounds * 4 and v.states[NODE].last_seq == rounds
    assert v.states[GW].missing == [] and v.states[NODE].missing == []
    nums = node_key.public_key.public_numbers()
    msg = Sign1Message.decode(relayed[0])
    msg.key = EC2Key(crv=P256, x=nums.x.to_bytes(32, "big"), y=nums.y.to_bytes(32, "big"))
    assert msg.verify_signature()
