"""Buffer full (agent + real ring buffer, on CPython): the oldest batches are dropped, each
drop is reported by a signed drop record, and the counts are exact, across a reboot too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cityedge_core import batch as batchmod
from cityedge_core import chain, cose, p256
from cityedge_fw import agent as agentmod
from cityedge_fw import drops, settings, store

DEVICE = "urn:dev:mac:0024befffe804ff1"
KEY = p256.PrivateKey(0xC0FFEE)
KID = cose.kid_for_public_key(KEY.public_key().to_sec1())


class Sensor:
    name = "s"

    def __init__(self) -> None:
        self.n = 0

    def read(self) -> list[tuple[str, str, float]]:
        self.n += 1
        if self.n % 9 == 0:
            raise OSError("bus error")
        return [("t", "Cel", 20.5), ("h", "%RH", float(self.n))]


class Board:
    name = "test"

    def unix_time(self) -> None:
        return None

    def free_heap(self) -> int:
        return 0

    def wdt_feed(self) -> None:
        pass

    def sensors(self, cfg: Any) -> list[Sensor]:
        return [Sensor()]


def make_agent(tmp: Path, budget: int) -> agentmod.Agent:
    return agentmod.Agent(Board(), DEVICE, KEY, KID, store.RingBuffer(str(tmp / "buf"), budget),
                          store.State(str(tmp / "state.cbor")),
                          settings.check({"batch_readings": 4, "buffer_budget_bytes": budget}),
                          "127.0.0.1", 1)


@pytest.mark.parametrize("budget", [4096, 6000])
def test_buffer_full_drops_oldest_and_reports_exact_counts(tmp_path: Path, budget: int) -> None:
    readings = 0
    a = make_agent(tmp_path, budget)
    for _ in range(40):
        readings += a.sweep()
    a.seal()
    a = make_agent(tmp_path, budget)  # reboot: chain and drop tally come back from flash
    assert a.boot == 2
    for _ in range(30):
        readings += a.sweep()
    a.seal()
    assert a.store.used_bytes <= budget
    assert a.store.count > 5  # no storm of drop records while the link is down
    assert a.report_drops()  # the link came up: one record for everything lost so far
    # (storing it may push one more batch out, which the next record reports)
    for _ in range(3):
        if not a.report_drops():
            break
    assert a.drops_total > 0 and a.state.get("drop") is None

    verifier = chain.BatchVerifier({KID: chain.KeyEntry(DEVICE, KEY.public_key())})
    kept_batches = kept_readings = lost_batches = lost_readings = 0
    for _seq, data in a.store.oldest(a.store.count):
        verdict = verifier.check(data)
        assert verdict.status in chain.ACCEPTED, verdict
        b = verdict.batch
        kept_batches += 1
        if b.kind == batchmod.KIND_DROP:
            first, last, batches, lost = b.dropped
            assert first <= last < b.seq
            lost_batches += batches
            lost_readings += lost
        else:
            kept_readings += len(b.records)
    assert kept_readings + lost_readings == readings
    assert kept_batches + lost_batches == a.writer.seq
    assert verifier.states[DEVICE].missing_count() == 0  # every gap explained by a record


def test_drop_tally_of_a_drop_record_passes_its_counts_on() -> None:
    w = batchmod.BatchWriter(DEVICE, KEY, KID, seq=9)
    rec = w.sign([], 1, batchmod.TIME_SINCE_BOOT, batchmod.KIND_DROP, [2, 8, 7, 25])
    assert drops.tally(10, rec) == [2, 10, 8, 25]
    data = w.sign([{0: "t", 2: 1}], 1, batchmod.TIME_SINCE_BOOT)
    assert drops.tally(11, data) == [11, 11, 1, 1]
    assert drops.merge([2, 10, 8, 25], [11, 11, 1, 1]) == [2, 11, 9, 26]
    assert drops.tally(12, b"garbage") == [12, 12, 1, 0]


def test_doomed_counts_from_headers_and_decodes_only_what_has_none(tmp_path: Path) -> None:
    """The overflow tally reads a reading batch's count from its header (meta) and
    decodes only a batch without one; both give the counts a full decode gives."""
    w = batchmod.BatchWriter(DEVICE, KEY, KID)
    with_meta = store.RingBuffer(str(tmp_path / "a"), 1 << 20)
    without = store.RingBuffer(str(tmp_path / "b"), 1 << 20)
    for n in (3, 0, 5, 1):
        records = [{0: "t", 2: float(i)} for i in range(n)]
        data = w.sign(records, 1, batchmod.TIME_SINCE_BOOT)
        with_meta.append(w.seq, data, n + 1)
        without.append(w.seq, data)
    rec = w.sign([], 1, batchmod.TIME_SINCE_BOOT, batchmod.KIND_DROP, [1, 1, 1, 4])
    with_meta.append(w.seq, rec)  # a drop record: no meta, decoded
    without.append(w.seq, rec)
    for excess in (1, 500, 10_000):
        got = drops.doomed(with_meta, excess)
        assert got == drops.doomed(without, excess)
    assert drops.doomed(with_meta, 10_000) == [1, 5, 6, 4 + 9]  # all, incl. the record's
    assert drops.doomed(with_meta, 1) == [1, 1, 1, 3]
