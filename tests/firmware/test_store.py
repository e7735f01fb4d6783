"""The flash ring buffer and state file on CPython with a plain directory (same code as on flash).

Power cuts on LittleFS are in ``test_store_powercut.py``; here: ordering, PUBACK removal,
budget drops with exact counts, drop records surviving a reboot, corrupt files, State.
"""

import itertools
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from cityedge_core.errors import StorageError
from cityedge_fw.store import HEADER_SIZE, RingBuffer, State

from support.ring_reader import oldest, seqs


def _data(seq: int, n: int = 100) -> bytes:
    return bytes((seq + i) & 0xFF for i in range(n))


def test_append_oldest_remove_and_reopen(tmp_path: Path) -> None:
    rb = RingBuffer(str(tmp_path / "rb"), 10_000)
    for seq in range(1, 6):
        rb.append(seq, _data(seq))
    assert rb.count == 5
    assert rb.used_bytes == 5 * (100 + HEADER_SIZE)
    assert [s for s, _ in oldest(rb, 3)] == [1, 2, 3]
    assert rb.remove(1) and rb.remove(3)
    assert not rb.remove(3)  # a second PUBACK for the same batch is harmless
    again = RingBuffer(str(tmp_path / "rb"), 10_000)
    assert oldest(again, 10) == [(2, _data(2)), (4, _data(4)), (5, _data(5))]
    assert again.used_bytes == 3 * (100 + HEADER_SIZE)
    with pytest.raises(ValueError, match="not after"):
        again.append(5, b"x")


def test_append_of_chunks_stores_what_their_join_would(tmp_path: Path) -> None:
    a = RingBuffer(str(tmp_path / "a"), 10_000)
    b = RingBuffer(str(tmp_path / "b"), 10_000)
    data = _data(7, 300)
    a.append(7, (data[:5], bytearray(data[5:200]), memoryview(data)[200:]))
    b.append(7, data)
    assert (a.used_bytes, oldest(a, 1)) == (b.used_bytes, [(7, data)])
    assert (tmp_path / "a" / "000000000007.b").read_bytes() == \
        (tmp_path / "b" / "000000000007.b").read_bytes()
    assert oldest(RingBuffer(str(tmp_path / "a"), 10_000), 1) == [(7, data)]  # CRC holds


def ledger(rb: RingBuffer) -> list[list[int]]:
    """The owner's drop ledger: every ``on_drop`` call, with the files still readable."""
    calls: list[list[int]] = []

    def on_drop(seqs: list[int]) -> None:
        assert all(rb.read(s) is not None or rb.meta(s) is not None for s in seqs)
        calls.append(list(seqs))

    rb.on_drop = on_drop
    return calls


def test_budget_full_drops_oldest_and_counts_exactly(tmp_path: Path) -> None:
    per = 100 + HEADER_SIZE
    rb = RingBuffer(str(tmp_path / "rb"), 4 * per)
    got = ledger(rb)
    for seq in range(1, 5):
        rb.append(seq, _data(seq))
    assert got == []
    rb.append(5, _data(5))  # one over: batch 1 goes
    rb.append(6, _data(6))  # and batch 2
    assert seqs(rb) == [3, 4, 5, 6]
    assert rb.used_bytes == 4 * per
    assert got == [[1], [2]] and rb.dropped == 2
    rb.append(7, _data(7, 2 * 100 + HEADER_SIZE))  # needs two slots: 3 and 4 go
    assert got[2:] == [[3, 4]]


def test_batches_the_owner_keeps_are_dropped_last(tmp_path: Path) -> None:
    """Batches sent and not acknowledged (``keep``) stay; the next oldest go instead, and
    only when nothing else is left do the kept ones go too."""
    per = 100 + HEADER_SIZE
    rb = RingBuffer(str(tmp_path / "rb"), 4 * per)
    got = ledger(rb)
    for seq in range(1, 5):
        rb.append(seq, _data(seq))
    rb.keep.extend([1, 2])
    rb.append(5, _data(5))
    assert got == [[3]] and seqs(rb) == [1, 2, 4, 5]
    rb.append(6, _data(6, 4 * 100 + 3 * HEADER_SIZE))  # room for it alone: all go
    assert got[1:] == [[4, 5, 1, 2]] and seqs(rb) == [6]


def test_reopen_finishes_a_cut_drop_but_spares_kept_batches(tmp_path: Path) -> None:
    """A power cut after the owner recorded a drop, before the files went: the reopen
    deletes them (the owner counted them lost) but not a kept batch below them."""
    per = 50 + HEADER_SIZE
    root = tmp_path / "rb"
    rb = RingBuffer(str(root), 3 * per)
    ledger(rb)
    for seq in range(1, 4):
        rb.append(seq, _data(seq, 50))
    saved = {s: (root / ("%012x.b" % s)).read_bytes() for s in (2, 3)}
    rb.keep.append(1)
    rb.append(4, _data(4, 50))
    rb.append(5, _data(5, 50))
    assert seqs(rb) == [1, 4, 5]
    for s, raw in saved.items():  # as if the deletes were cut short
        (root / ("%012x.b" % s)).write_bytes(raw)
    again = RingBuffer(str(root), 3 * per)
    assert seqs(again) == [1, 4, 5]
    assert [s for s, _ in oldest(again, 5)] == [1, 4, 5]


def test_corrupt_file_is_dropped_and_reported_not_handed_out(tmp_path: Path) -> None:
    rb = RingBuffer(str(tmp_path / "rb"), 10_000)
    for seq in (1, 2, 3):
        rb.append(seq, _data(seq))
    path = tmp_path / "rb" / ("%012x.b" % 2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit: the CRC catches it
    path.write_bytes(bytes(raw))
    got = ledger(rb)
    assert [s for s, _ in oldest(rb, 5)] == [1, 3]
    assert got == [[2]]
    assert not path.exists()


def test_next_after_reads_the_next_batch_past_a_seq(tmp_path: Path) -> None:
    rb = RingBuffer(str(tmp_path / "rb"), 10_000)
    for seq in (1, 2, 4, 5):
        rb.append(seq, _data(seq))
    assert rb.next_after(0) == (1, _data(1))
    assert rb.next_after(2) == (4, _data(4))  # a gap in seq is skipped, not waited for
    assert rb.next_after(5) is None
    path = tmp_path / "rb" / ("%012x.b" % 4)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    got = ledger(rb)
    assert rb.next_after(2) == (5, _data(5))  # the corrupt one: dropped, reported, skipped
    assert got == [[4]]
    assert rb.count == 3 and not path.exists()



def test_next_after_reads_into_the_callers_buffer_when_the_batch_fits(tmp_path: Path) -> None:
    rb = RingBuffer(str(tmp_path / "rb"), 10_000)
    rb.append(1, _data(1, 100))
    rb.append(2, _data(2, 300))
    rb.append(3, _data(3, 100))
    buf = bytearray(200)
    seq, data = rb.next_after(0, buf)  # type: ignore[misc]
    assert seq == 1 and isinstance(data, memoryview) and data.obj is buf
    assert bytes(data) == _data(1, 100)
    seq, data = rb.next_after(1, buf)  # type: ignore[misc]
    assert seq == 2 and isinstance(data, bytes) and data == _data(2, 300)  # did not fit
    assert bytes(buf[:100]) == _data(1, 100)  # and the buffer was left alone
    path = tmp_path / "rb" / ("%012x.b" % 3)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    got = ledger(rb)
    assert rb.next_after(2, buf) is None  # the CRC is checked in the buffer too
    assert got == [[3]]



@given(st.integers(1, 0xFFFFFFFFFFFF), st.integers(0, 0xFFFF))
@settings(max_examples=30, deadline=None)
def test_meta_rides_in_the_header_and_never_changes_the_seq(
        tmp_path_factory: pytest.TempPathFactory, seq: int, meta: int) -> None:
    root = str(tmp_path_factory.mktemp("rb"))
    rb = RingBuffer(root, 10_000)
    rb.append(seq, _data(seq), meta)
    again = RingBuffer(root, 10_000)
    assert seqs(again) == [seq] and again.meta(seq) == meta
    assert again.next_after(seq - 1) == (seq, _data(seq))
    assert again.size(seq) == 100 + HEADER_SIZE
    assert again.meta(seq + 1) is None  # not held


def test_meta_defaults_to_zero_and_is_bounded(tmp_path: Path) -> None:
    rb = RingBuffer(str(tmp_path / "rb"), 10_000)
    rb.append(1, _data(1))
    assert rb.meta(1) == 0  # "not recorded", as in files written before meta existed
    with pytest.raises(ValueError, match="meta"):
        rb.append(2, _data(2), 0x10000)
    path = tmp_path / "rb" / ("%012x.b" % 1)
    path.write_bytes(b"XXXX" + path.read_bytes()[4:])
    assert rb.meta(1) is None  # not our header


def test_stray_temp_file_from_a_cut_is_cleaned(tmp_path: Path) -> None:
    root = tmp_path / "rb"
    rb = RingBuffer(str(root), 10_000)
    rb.append(1, _data(1))
    (root / ("%012x.b.tmp" % 2)).write_bytes(b"half a batch")
    rb = RingBuffer(str(root), 10_000)
    assert seqs(rb) == [1]
    assert os.listdir(root) == ["%012x.b" % 1]


def test_misuse_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RingBuffer(str(tmp_path / "rb"), HEADER_SIZE)
    rb = RingBuffer(str(tmp_path / "rb"), 200)
    with pytest.raises(ValueError, match="exceeds the budget"):
        rb.append(1, bytes(500))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 400)), min_size=1, max_size=60))
def test_accounting_matches_disk(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[bool, int]]
) -> None:
    root = str(tmp_path_factory.mktemp("rb"))
    budget = 2000
    rb = RingBuffer(root, budget)
    seq = 0
    dropped = 0
    removed = 0
    for add, size in ops:
        if add or rb.count == 0:
            seq += 1
            rb.append(seq, _data(seq, size))
            dropped = rb.dropped
        else:
            assert rb.remove(seqs(rb)[0])
            removed += 1
        assert rb.used_bytes <= budget
    assert dropped + removed + rb.count == seq  # every batch is held, removed or counted
    again = RingBuffer(root, budget)
    assert seqs(again) == seqs(rb)
    assert again.used_bytes == rb.used_bytes
    assert [s for s, _ in oldest(again, 1000)] == seqs(rb)



def _runs_well_formed(runs: list[int]) -> bool:
    """Ascending, disjoint, and never two runs that touch (they would be one)."""
    pairs = list(zip(runs[::2], runs[1::2], strict=True))
    return all(a <= b for a, b in pairs) and all(
        b + 1 < c for (_, b), (c, _) in itertools.pairwise(pairs))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("aarx"), st.integers(0, 10_000)), max_size=80))
def test_index_of_runs_matches_a_set_through_any_acks_and_reopens(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    """PUBACKs in any order (``r``: remove a held batch picked by ``n``) split and join the
    runs; a reopen (``x``) rebuilds them from the directory in whatever order it lists."""
    root = str(tmp_path_factory.mktemp("rb"))
    rb = RingBuffer(root, 1_000_000)
    held: set[int] = set()
    seq = 0
    for op, n in ops:
        if op == "a":
            seq += 1 + n % 3  # the agent's drop records and failed seals leave gaps too
            rb.append(seq, _data(seq, 10 + n % 50))
            held.add(seq)
        elif op == "r" and held:
            gone = sorted(held)[n % len(held)]
            assert rb.remove(gone)
            held.discard(gone)
            assert not rb.remove(gone)
        elif op == "x":
            rb = RingBuffer(root, 1_000_000)
        assert seqs(rb) == sorted(held)
        assert rb.count == len(held)
        assert _runs_well_formed(rb._runs)
        assert rb.newest == (max(held) if held else 0)
        on_disk = sum(f.stat().st_size for f in Path(root).glob("*.b"))
        assert rb.used_bytes == on_disk
    after = 0
    for want in sorted(held):
        got = rb.next_after(after)
        assert got is not None and got[0] == want
        after = want
    assert rb.next_after(after) is None


def test_state_atomic_set_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "state.cbor")
    s = State(path)
    assert s.get("seq", 0) == 0
    s.set(seq=7, head=b"\x01" * 32, boot=3)
    s.set(seq=8)
    again = State(path)
    assert (again.get("seq"), again.get("head"), again.get("boot")) == (8, b"\x01" * 32, 3)
    again.set(boot=None)
    assert State(path).get("boot") is None
    assert not os.path.exists(path + ".tmp")


def test_state_corrupt_file_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "state.cbor"
    path.write_bytes(b"\xa1\x63seq")  # truncated CBOR
    with pytest.raises(StorageError, match="corrupt"):
        State(str(path))


def test_state_write_failure_keeps_old_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "state.cbor")
    s = State(path)
    s.set(seq=1)

    def broken_rename(a: str, b: str) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(StorageError):
        s.set(seq=2)
    monkeypatch.undo()
    assert s.get("seq") == 1
    assert State(path).get("seq") == 1
    assert not os.path.exists(path + ".tmp")
