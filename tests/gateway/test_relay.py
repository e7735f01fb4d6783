"""Node relay: valid batches stored byte-identical (and verify with pycose); forged,
replayed, foreign and unknown batches rejected and counted per node; state survives restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message

from cityedge_core import batch, senml
from cityedge_core.errors import StorageError
from cityedge_gateway.relay import ACK_ONLY, FORWARD, REJECT, NodeRelay
from cityedge_gateway.store import Store
from cityedge_host.crypto import EcSigner

NODE_A = "urn:dev:mac:0024befffe804ff1"
NODE_B = "urn:dev:mac:0024befffe804ff2"


def _recs(n: int) -> list[dict[int, object]]:
    return [{senml.N: "t", senml.U: "Cel", senml.V: 20 + i, senml.T: 1.7e9 + i} for i in range(n)]


def _pycose_verifies(data: bytes, signer: EcSigner) -> bool:
    nums = signer.public_key.public_numbers()
    msg = Sign1Message.decode(data)
    msg.key = EC2Key(crv=P256, x=nums.x.to_bytes(32, "big"), y=nums.y.to_bytes(32, "big"))
    return bool(msg.verify_signature())


def test_relay_forwards_valid_and_rejects_bad(tmp_path: Path) -> None:
    ka, kb, mallory = EcSigner.generate(), EcSigner.generate(), EcSigner.generate()
    nodes = {NODE_A: ka.verifier(), NODE_B: kb.verifier()}
    store = Store(tmp_path / "b.sqlite", 10**7)
    relay = NodeRelay(nodes, store)
    wa = batch.BatchWriter(NODE_A, ka, ka.kid)
    a1, a2, a3 = wa.sign(_recs(3), 1), wa.sign(_recs(2), 1), wa.sign(_recs(1), 1)
    forged = batch.BatchWriter(NODE_A, mallory, ka.kid, wa.seq, wa.head).sign(_recs(1), 1)
    tampered = bytearray(a3)
    tampered[-70] ^= 1  # inside the payload
    b1 = batch.BatchWriter(NODE_B, kb, kb.kid).sign(_recs(4), 1)

    decisions = [relay.check(NODE_A, a1), relay.check(NODE_A, a2)]
    assert [d.action for d in decisions] == [FORWARD, FORWARD]
    relay.commit(decisions)
    assert relay.check(NODE_A, a1).action == ACK_ONLY  # redelivery of a stored batch
    assert relay.check(NODE_A, forged).status == "bad_signature"
    assert relay.check(NODE_A, bytes(tampered)).status == "bad_signature"
    assert relay.check(NODE_A, b"\xd2\x84garbage").status == "malformed"
    foreign = relay.check(NODE_A, b1)  # node B's batch on node A's link
    assert (foreign.action, foreign.status) == (REJECT, "wrong_link")
    stats = relay.stats[NODE_A]
    assert stats.accepted == 2 and stats.duplicates == 1
    assert stats.failures == {"bad_signature": 2, "malformed": 1, "wrong_link": 1}
    assert relay.stats[NODE_B].failures == {}

    rows = store.oldest(10)
    assert [r.data for r in rows] == [a1, a2]  # byte-identical, no re-signing
    assert _pycose_verifies(rows[0].data, ka)
    store.close()

    # After a restart the node chain is remembered: an old batch is a replay, not new data.
    store2 = Store(tmp_path / "b.sqlite", 10**7)
    relay2 = NodeRelay(nodes, store2)
    d3 = relay2.check(NODE_A, a3)
    assert (d3.action, d3.status) == (FORWARD, "ok")
    relay2.commit([d3])
    wa.seq, wa.head = 0, batch.ZERO_HASH  # a captured seq-1 batch with new content
    replay = relay2.check(NODE_A, wa.sign(_recs(1), 1))
    assert (replay.action, replay.status) == (REJECT, "replay")
    assert relay2.check(NODE_B, b1).action == FORWARD


def test_failed_commit_rolls_back_node_state(tmp_path: Path) -> None:
    ka = EcSigner.generate()
    store = Store(tmp_path / "b.sqlite", 10**7)
    relay = NodeRelay({NODE_A: ka.verifier()}, store)
    a1 = batch.BatchWriter(NODE_A, ka, ka.kid).sign(_recs(1), 1)
    d = relay.check(NODE_A, a1)
    store._db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'x'); END"
    )
    with pytest.raises(StorageError):
        relay.commit([d])
    store._db.execute("DROP TRIGGER boom")
    again = relay.check(NODE_A, a1)  # not stored: must be accepted again, not a duplicate
    assert (again.action, again.status) == (FORWARD, "ok")
