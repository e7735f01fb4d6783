"""Power cuts under the flash ring buffer, on the real MicroPython unix port with LittleFS.

This file is both the pytest module (CPython side, bottom) and the MicroPython script those
tests run (top): ``micropython test_store_powercut.py sweep SEED`` or
``... one SEED PERMILLE MODE TEAR``. The script formats ``vfs.VfsLfs2`` on ``simbus.CutFlash``,
runs a seeded workload (appends, drop records, PUBACK removals, state updates, clean reboots)
and cuts the power at one flash operation; then it mounts a fresh file system on the image
that was left and checks: every batch whose ``append`` returned is there and intact, or was
removed after its PUBACK, or is covered by a drop record; nothing corrupt is handed out;
the state file holds the old or the new values; the buffer still works.
"""

import sys

try:  # CPython (pytest) side; MicroPython has none of these and runs ``mp_main`` instead
    import subprocess
    from pathlib import Path

    import pytest
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    CPYTHON = True
except ImportError:
    CPYTHON = False

BLOCK_SIZE = 512  # bytes per flash block (small blocks: more block turnover per batch)
BLOCKS = 48  # 24 KiB file system
BUDGET = 2600  # bytes of ring buffer: drops happen within the workload
OPS = 48  # workload steps per run


# ---------------------------------------------------------------- MicroPython side


class Rng:
    """A tiny LCG: the same workload for the same seed on every interpreter."""

    def __init__(self, seed):
        self.x = (seed * 2654435761 + 12345) & 0x7FFFFFFF

    def next(self):
        self.x = (self.x * 1103515245 + 12345) & 0x7FFFFFFF
        return self.x >> 8


def payload(seq):
    n = (seq * 7919) % 280 + 1
    return bytes([(seq * 31 + i) & 0xFF for i in range(n)])


class Model:
    """What the workload was told (acknowledged) before the cut."""

    def __init__(self):
        self.acked = set()  # seqs whose append returned
        self.removed = set()  # seqs whose remove (after PUBACK) returned
        self.reported = []  # drop ranges whose signed drop record append returned
        self.uncertain = set()  # seqs of operations that failed or were in flight
        self.inflight = None  # seq of the operation in progress
        self.drop_inflight = None  # (seq, range) of a drop record being appended
        self.state_done = 0  # seq value the last completed State.set wrote
        self.state_inflight = None


FRESH = []  # drop ranges the ledger took since the last drop record's append began


def _merge(a, b):
    if a is None:
        return b
    return [min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2]]


def seqs(rb):
    """Sequence numbers held (``support.ring_reader.seqs``; this file runs on MicroPython)."""
    out = []
    r = rb._runs
    for i in range(0, len(r), 2):
        out.extend(range(r[i], r[i + 1] + 1))
    return out


def oldest(rb, n):
    """Up to ``n`` ``(seq, data)``, oldest first (``support.ring_reader.oldest``)."""
    out = []
    after = 0
    while len(out) < n:
        got = rb.next_after(after)
        if got is None:
            break
        out.append(got)
        after = got[0]
    return out


def _open(root):
    """The ring buffer and its owner's state file, with the owner's drop ledger in it (as
    the agent keeps it: ``drop`` in the state, written before the files go)."""
    from cityedge_fw.store import RingBuffer, State

    rb, state = RingBuffer(root + "/rb", BUDGET), State(root + "/state.cbor")

    def on_drop(seqs):
        new = [min(seqs), max(seqs), len(seqs)]
        state.set(drop=_merge(state.get("drop"), new))
        FRESH.append(new)

    rb.on_drop = on_drop
    return rb, state


def _reopen(root):
    from cityedge_core.errors import StorageError

    for _ in range(3):  # a flaky write may hit the reopen itself (tmp cleanup)
        try:
            return _open(root)
        except StorageError:
            pass
    return _open(root)


def workload(root, seed, m, flash):
    import hashlib

    from cityedge_core.errors import StorageError

    rng = Rng(seed)
    rb, state = _reopen(root)
    seq = state.get("seq", 0)
    for _ in range(OPS):
        r = rng.next() % 10
        try:
            if r < 7 or rb.count == 0:
                seq += 1
                m.inflight = seq
                rb.append(seq, payload(seq))
                m.acked.add(seq)
                drops = state.get("drop")
                while drops:  # the agent signs and stores a drop record right away
                    seq += 1
                    m.inflight = seq
                    m.drop_inflight = (seq, tuple(drops))
                    del FRESH[:]
                    rb.append(seq, payload(seq))
                    m.acked.add(seq)
                    m.reported.append(drops)
                    m.drop_inflight = None
                    fresh = None
                    for d in FRESH:  # what this append pushed out: the next record's
                        fresh = _merge(fresh, d)
                    state.set(drop=fresh)
                    drops = fresh
                m.state_inflight = seq
                state.set(seq=seq, head=hashlib.sha256(payload(seq)).digest())
                m.state_done = seq
                m.state_inflight = None
            elif r < 9:
                for s, data in oldest(rb, r % 3):
                    assert data == payload(s), "batch %d handed out corrupt" % s
                    m.inflight = s
                    rb.remove(s)
                    m.removed.add(s)
            else:  # a clean reboot
                rb, state = _reopen(root)
        except StorageError:  # "flaky" mode: one write failed; the agent reboots
            if flash.dead:  # the cut, seen through a failed close(): power is gone
                return seq
            m.uncertain.add(m.inflight)
            if m.drop_inflight is not None:
                m.uncertain.add(m.drop_inflight)
                m.drop_inflight = None
            if m.state_inflight is not None:
                m.uncertain.add(("state", m.state_inflight))
            rb, state = _reopen(root)
        m.inflight = None
    return seq


def check(root, m):
    """After remount: nothing acknowledged lost, nothing corrupt, state old-or-new."""
    import hashlib

    rb, state = _open(root)
    present = seqs(rb)
    got = oldest(rb, len(present))
    assert [s for s, _ in got] == present, "corrupt batches on flash: %r vs %r" % (got, present)
    for s, data in got:
        assert data == payload(s), "batch %d corrupt after remount" % s
    after = state.get("drop")
    reported = m.reported + ([after] if after else [])
    uncertain = set(m.uncertain)
    if m.inflight is not None:
        uncertain.add(m.inflight)
    if m.drop_inflight is not None:
        uncertain.add(m.drop_inflight)
    for tag in uncertain:  # a drop record whose append was cut but landed reports its range
        if isinstance(tag, tuple) and tag[0] in present:
            reported.append(tag[1])
    lost = 0
    for s in m.acked:
        if s in m.removed:
            assert s not in present, "batch %d came back after its PUBACK removal" % s
        elif s not in present and s not in uncertain:  # (a cut PUBACK removal may land)
            ok = False
            for d in reported:
                if d[0] <= s <= d[1]:
                    ok = True
            assert ok, "batch %d acknowledged, not removed, gone and no drop record" % s
            lost += 1
    for s in present:
        assert (
            s in m.acked or s in uncertain or s in [t[0] for t in uncertain if isinstance(t, tuple)]
        ), "batch %d never acknowledged" % s
    assert sum(d[2] for d in reported) >= lost, "drop counts short: %r < %d" % (reported, lost)
    value = state.get("seq", 0)
    allowed = [m.state_done]
    if m.state_inflight is not None:
        allowed.append(m.state_inflight)
    for tag in uncertain:
        if isinstance(tag, tuple) and tag[0] == "state":
            allowed.append(tag[1])
    assert value in allowed, "state seq %r not in %r" % (value, allowed)
    if value:
        assert state.get("head") == hashlib.sha256(payload(value)).digest(), "state torn"
    nxt = max(list(m.acked) + present + [value]) + 1000
    rb.append(nxt, b"after the cut")
    assert oldest(rb, rb.count)[-1] == (nxt, b"after the cut")
    return len(present), lost


def run_once(base, seed, cut_at, mode, tear):
    """One workload on a fresh image with a cut at flash op ``cut_at``; check after remount."""
    import vfs

    from simbus import CutFlash, PowerCut

    flash = CutFlash(BLOCK_SIZE, BLOCKS, base, cut_at, mode, tear)
    vfs.mount(vfs.VfsLfs2(flash), "/flash")
    m = Model()
    try:  # noqa: SIM105 (no contextlib on MicroPython)
        workload("/flash", seed, m, flash)
    except PowerCut:
        pass
    try:  # noqa: SIM105
        vfs.umount("/flash")
    except Exception:  # the dead file system may not unmount cleanly: it is discarded
        pass
    fresh = CutFlash(BLOCK_SIZE, BLOCKS, flash.image())
    vfs.mount(vfs.VfsLfs2(fresh), "/flash")
    try:
        present, lost = check("/flash", m)
    finally:
        vfs.umount("/flash")
    return flash.ops, flash.dead, present, lost


def mp_main(argv):
    import vfs

    here = argv[0].rsplit("/", 1)[0] if "/" in argv[0] else "."
    sys.path.insert(0, here)
    sys.path.insert(0, here + "/../../firmware")
    from simbus import CutFlash

    blank = CutFlash(BLOCK_SIZE, BLOCKS)
    vfs.VfsLfs2.mkfs(blank)
    base = blank.image()
    seed = int(argv[2])
    total = run_once(base, seed, -1, "fail", 0)[0]  # dry run: how many flash ops
    if argv[1] == "sweep":  # every cut point, alternating the failure kind
        modes = ("fail", "tear", "flaky")
        for cut_at in range(total):
            try:
                run_once(base, seed, cut_at, modes[cut_at % 3], cut_at * 7)
            except AssertionError:
                print("FAILED at cut=%d mode=%s tear=%d" % (cut_at, modes[cut_at % 3], cut_at * 7))
                raise
        print("OK sweep seed=%d cuts=%d" % (seed, total))
    else:
        cut_at = total * int(argv[3]) // 1000
        _, cut, present, lost = run_once(base, seed, cut_at, argv[4], int(argv[5]))
        print(
            "OK one seed=%d cut=%d/%d mode=%s power_cut=%s present=%d lost=%d"
            % (seed, cut_at, total, argv[4], cut, present, lost)
        )


if not CPYTHON and __name__ == "__main__":
    mp_main(sys.argv)


# ---------------------------------------------------------------- CPython (pytest) side

if CPYTHON:
    HERE = Path(__file__).resolve().parent
    MICROPYTHON = HERE.parents[1] / ".venv" / "bin" / "micropython"

    def _run(*args: object) -> str:
        if not MICROPYTHON.exists():
            pytest.fail("micropython not found: run `make setup`")
        proc = subprocess.run(
            [str(MICROPYTHON), str(HERE / "test_store_powercut.py")] + [str(a) for a in args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=HERE,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("OK"), proc.stdout
        return proc.stdout

    def test_every_cut_point_of_one_workload_on_littlefs() -> None:
        out = _run("sweep", 7)
        cuts = int(out.split("cuts=")[1])
        assert cuts > 100  # the workload really writes flash many times

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        seed=st.integers(0, 10_000),
        permille=st.integers(0, 1000),
        mode=st.sampled_from(["fail", "tear", "flaky"]),
        tear=st.integers(0, 4096),
    )
    def test_power_cut_anywhere_keeps_acknowledged_batches(
        seed: int, permille: int, mode: str, tear: int
    ) -> None:
        _run("one", seed, permille, mode, tear)
