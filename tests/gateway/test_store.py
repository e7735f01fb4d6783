"""SQLite store-and-forward: durability, chain state, disk budget and signed drop records."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityedge_core import batch, chain, senml
from cityedge_core.errors import StorageError
from cityedge_gateway import limits
from cityedge_gateway.store import Relayed, Store
from cityedge_host.crypto import EcSigner

DEVICE = "urn:dev:mac:b827ebfffe123456"
NODE = "urn:dev:mac:0024befffe804ff1"


def _records(n: int, base: float = 1.7e9) -> list[dict[int, object]]:
    return [
        {senml.N: "pm/pm25", senml.U: "ug/m3", senml.V: i / 10, senml.T: base + i} for i in range(n)
    ]


def _verifier(signer: EcSigner) -> chain.BatchVerifier:
    return chain.BatchVerifier({signer.kid: chain.KeyEntry(DEVICE, signer.verifier())})


def test_commit_read_delete_and_chain_resumes(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    s = Store(tmp_path / "b.sqlite", 10**7)
    w = s.attach_writer(DEVICE, signer, signer.kid)
    assert s.boot == 1
    s.commit(own=[_records(50), _records(50)], relayed=[Relayed(NODE, 7, 3, b"node-bytes")])
    rows = s.oldest(10)
    assert [r.device for r in rows] == [DEVICE, DEVICE, NODE]
    assert rows[2].data == b"node-bytes"
    s.delete([rows[0].id, rows[2].id])
    assert [r.id for r in s.oldest(10)] == [rows[1].id]
    assert s.oldest(10, after_id=rows[1].id) == []
    head = w.head
    s.close()
    s2 = Store(tmp_path / "b.sqlite", 10**7)
    w2 = s2.attach_writer(DEVICE, signer, signer.kid)
    assert (s2.boot, w2.seq, w2.head) == (2, 2, head)
    assert s2.used_bytes == len(rows[1].data) + limits.STORE_ROW_OVERHEAD_BYTES
    s2.commit(own=[_records(5)])
    v = _verifier(signer)
    assert [v.check(r.data).status for r in s2.oldest(10)] == ["gap", "ok"]  # seq 1 was sent


def test_failed_commit_leaves_writer_and_store_unchanged(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    s = Store(tmp_path / "b.sqlite", 10**7)
    w = s.attach_writer(DEVICE, signer, signer.kid)
    s.commit(own=[_records(3)])
    before = (w.seq, w.head, s.used_bytes)
    s._db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(StorageError, match="disk full"):
        s.commit(own=[_records(3), _records(3)])
    assert (w.seq, w.head, s.used_bytes) == before
    assert s.depth() == 1


def test_other_identity_refused(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    Store(tmp_path / "b.sqlite", 10**7).attach_writer(DEVICE, signer, signer.kid)
    with pytest.raises(StorageError, match="belongs to"):
        Store(tmp_path / "b.sqlite", 10**7).attach_writer(NODE, signer, signer.kid)


def test_budget_drops_oldest_with_exact_signed_drop_record(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    budget = limits.STORE_BUDGET_MIN_BYTES
    s = Store(tmp_path / "b.sqlite", budget)
    s.attach_writer(DEVICE, signer, signer.kid)
    v = _verifier(signer)
    sizes: dict[int, int] = {}  # seq -> readings of every own reading batch
    node_batches = node_readings = 0
    reports = []
    for i in range(150):
        n = 1 + i % 20
        report = s.commit(own=[_records(n)], relayed=[Relayed(NODE, i + 1, 2, bytes(300))])
        node_batches += 1
        node_readings += 2
        reports.append(report.own)
        sizes[s.writer.seq if report.own == [] else s.writer.seq - 1] = n  # type: ignore[union-attr]
        assert s.used_bytes <= budget
    # Read back: every kept own batch verifies; drop records cover exactly the missing seqs.
    kept = [r for r in s.oldest(10_000)]
    assert s.used_bytes == sum(len(r.data) + limits.STORE_ROW_OVERHEAD_BYTES for r in kept)
    own = [v.check(r.data) for r in kept if r.device == DEVICE]
    assert all(x.status in ("ok", "gap") for x in own), [x.status for x in own]
    drops = [x.batch for x in own if x.batch.kind == batch.KIND_DROP]
    assert drops, "the budget must have been exceeded"
    # Each kept drop record says what its commit reported (earlier ones may be dropped too).
    assert [d.dropped for d in drops] == [r for r in reports if r][-len(drops) :]
    dropped_batches = sum(r[2] for r in reports if r)
    dropped_readings = sum(r[3] for r in reports if r)
    kept_seqs = {x.batch.seq for x in own}
    all_seqs = set(range(1, s.writer.seq + 1))  # type: ignore[union-attr]
    missing = all_seqs - kept_seqs
    assert dropped_batches == len(missing)
    assert dropped_readings == sum(sizes.get(q, 0) for q in missing)
    for d in drops:
        assert d.dropped[0] <= d.dropped[1] < d.seq
    kept_node = [r for r in kept if r.device == NODE]
    assert s.node_drops()[NODE] == (
        node_batches - len(kept_node),
        2 * (node_batches - len(kept_node)),
    )


CHILD = (
    r"""
import sys, random
from pathlib import Path
from cityedge_host.crypto import load_signer
from cityedge_core import senml
from cityedge_gateway.store import Store
signer = load_signer(Path(sys.argv[2]))
s = Store(Path(sys.argv[1]), 10**9)
w = s.attach_writer("%s", signer, signer.kid)
recs = [{senml.N: "t", senml.U: "Cel", senml.V: 1.5, senml.T: 1.7e9 + i} for i in range(50)]
print("ready", w.seq, flush=True)
while True:
    s.commit(own=[recs] * random.randint(1, 30))
    print("ack", w.seq, w.head.hex(), flush=True)
"""
    % DEVICE
)


def test_kill_9_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    key = tmp_path / "gw.key"
    signer.save(key)
    db = tmp_path / "b.sqlite"
    rng = random.Random(4)
    acked: dict[int, str] = {}
    start = time.monotonic()
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(key)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        assert child.stdout.readline().startswith("ready")
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        for line in child.stdout.read().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ack" and len(parts[2]) == 64:
                acked[int(parts[1])] = parts[2]
        child.stdout.close()
    assert time.monotonic() - start < 30
    assert len(acked) >= 6
    s = Store(db, 10**9)
    v = _verifier(signer)
    verdicts = [v.check(r.data) for r in s.oldest(10**6)]
    assert [x.status for x in verdicts] == ["ok"] * len(verdicts)  # intact, unbroken chain
    digests = {x.batch.seq: x.digest.hex() for x in verdicts}
    for seq, head in acked.items():
        assert digests[seq] == head, "acknowledged batch %d lost or changed" % seq
    assert max(digests) >= max(acked)


class _FailsOnSecond:
    """A signer whose second signature fails (a key file gone bad, an HSM that hangs up)."""

    def __init__(self, signer: EcSigner) -> None:
        self.signer = signer
        self.calls = 0

    def sign(self, msg: bytes) -> bytes:
        self.calls += 1
        if self.calls == 2:
            raise OSError("the signing key is gone")
        return self.signer.sign(msg)


def test_a_signature_that_fails_moves_no_chain_and_stores_nothing(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    s = Store(tmp_path / "b.sqlite", 10**7)
    w = s.attach_writer(DEVICE, signer, signer.kid)
    s.commit(own=[_records(3)])
    before = (w.seq, w.head)
    w.signer = _FailsOnSecond(signer)
    with pytest.raises(OSError, match="signing key"):
        s.commit(own=[_records(3), _records(3)])  # the first is signed, the second fails
    assert (w.seq, w.head) == before
    assert len(s.oldest(10)) == 1
    w.signer = signer
    s.commit(own=[_records(3)])
    v = _verifier(signer)
    assert [v.check(r.data).status for r in s.oldest(10)] == ["ok", "ok"]
