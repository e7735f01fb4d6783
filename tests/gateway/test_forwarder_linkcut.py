"""The uplink fails while the broker stays up: a router that is down (connections reset,
new ones refused) and a silent link (bytes vanish; only keep-alive notices). Afterwards
every batch has arrived, oldest first, chain unbroken, and the store is empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cityedge_core import chain
from cityedge_gateway.config import BrokerConfig
from cityedge_gateway.forwarder import Forwarder
from cityedge_gateway.store import Store
from cityedge_host.crypto import EcSigner

from support.gateway import GW, recs, subscriber
from support.linkproxy import LinkProxy
from support.mosquitto import Mosquitto, TestPKI

ROUNDS = 60  # 4 batches of 50 readings each


@pytest.mark.parametrize("mode", ["router_down", "silent_blackhole"])
def test_link_cut_delivers_everything(mode: str, tmp_path: Path, pki: TestPKI) -> None:
    broker = Mosquitto(pki, extra="max_queued_messages 100000", clients=[GW]).start()
    link = LinkProxy(broker.port).start()
    creds = pki.issue_client(GW)
    creds.key_pem.chmod(0o600)
    cfg = BrokerConfig("127.0.0.1", link.port, pki.ca_pem, creds.cert_pem, creds.key_pem,
                       keepalive_s=2, inflight=32)  # fmt: skip
    signer = EcSigner.generate()
    store = Store(tmp_path / "b.sqlite", 10**8)
    store.attach_writer(GW, signer, signer.kid)
    fwd = Forwarder(cfg, GW, store)
    got: list[tuple[str, bytes]] = []

    async def produce(k: int) -> None:
        store.commit(own=[recs(50, k)] * 4)
        fwd.notify()
        await asyncio.sleep(0.01)

    async def scenario() -> None:
        up = asyncio.Event()
        sub = asyncio.create_task(subscriber(pki, broker.port, got, up))  # not behind the cut
        await asyncio.wait_for(up.wait(), 10)
        fwd_task = asyncio.create_task(fwd.run())
        for k in range(20):
            await produce(k)
        if mode == "router_down":
            link.cut(refuse=True)
        else:
            link.blackhole()
        for k in range(20, 40):  # accepted while the link is down: durable, not lost
            await produce(k)
        await asyncio.sleep(6)  # three keep-alive periods: the silent link is noticed
        assert store.depth() > 0
        link.restore()
        for k in range(40, ROUNDS):
            await produce(k)
        async with asyncio.timeout(60):
            while store.depth() or len({p for _, p in got}) < ROUNDS * 4:
                await asyncio.sleep(0.05)
        fwd_task.cancel()
        sub.cancel()

    try:
        asyncio.run(scenario())
    finally:
        link.close()
        broker.cleanup()
    assert fwd.stats.connects >= 2  # it noticed the dead link and reconnected
    v = chain.BatchVerifier({signer.kid: chain.KeyEntry(GW, signer.verifier())})
    statuses = [v.check(p).status for _, p in got]
    assert set(statuses) <= {"ok", "duplicate"}, statuses
    assert v.states[GW].last_seq == ROUNDS * 4 and v.states[GW].missing == []
