"""Store-and-forward buffer in SQLite: durable before acknowledged, bounded by a disk budget.

Every batch the gateway accepts (its own, signed here, or a node's, relayed unchanged) is
written by ``Store.commit`` in one transaction; when ``commit`` returns, the batches are on
disk and may be acknowledged (to a node) or published. A row is deleted only after the
broker's PUBACK (``Store.delete``), so a crash at any moment loses nothing acknowledged:
unsent rows are sent again after a restart (a duplicate the ingest recognises).

Durability: WAL with ``synchronous=FULL`` fsyncs the WAL on every commit, so a commit
survives a power cut as well as a ``kill -9`` (NORMAL would survive a process crash but may
lose the last commits on power loss, and an SD-card Pi loses power). The cost of one fsync
is shared by grouping many batches per transaction (``limits.STORE_COMMIT_MAX_BATCHES``).

The gateway's own chain state (last seq and hash, ``BatchWriter.seq``/``.head``) is written
in the same transaction as the batches it describes, so after a crash the chain resumes at
exactly the last durable batch; a batch signed but never committed was never sent, so its
seq may be reused.

Disk budget: the sum over rows of ``len(data) + limits.STORE_ROW_OVERHEAD_BYTES`` stays
at or under ``budget_bytes`` (counted, not ``stat``-ed, so it does not depend on SQLite's
page reuse). When a commit would exceed it, the oldest rows are deleted in that same
transaction. Dropped own batches are covered by one signed drop record (``KIND_DROP``,
``dropped=[first, last, batches, readings]``) that takes the next seq of the gateway's
chain. A node's dropped batches cannot be signed for (the gateway has not got the node's
key): they are counted per node in ``node_drops`` and reported in the status; the ingest
sees them as a gap in that node's chain.

The fleet-command state (the last seq taken, the answers kept: ``CommandState``) lives in
the same file's ``meta`` table, each change one durable transaction.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cityedge_core import batch, cbor
from cityedge_core.errors import StorageError

from . import limits
from .buffer_lock import BufferLock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    own INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS node_chain (device TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS node_drops (
    device TEXT PRIMARY KEY, batches INTEGER NOT NULL, readings INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Relayed:
    """A node's verified batch, to be stored and forwarded byte for byte."""

    device: str
    seq: int
    readings: int
    data: bytes


@dataclass(frozen=True)
class Stored:
    """A buffered batch as read back for forwarding."""

    id: int
    device: str
    data: bytes


@dataclass(frozen=True)
class DropReport:
    """What one commit had to drop to stay within the budget."""

    own: list[int]  # [first, last, batches, readings] or [] if no own batch was dropped
    nodes: dict[str, tuple[int, int]]  # device -> (batches, readings)


def _size(data: bytes) -> int:
    return len(data) + limits.STORE_ROW_OVERHEAD_BYTES


class Store:
    """The SQLite buffer. One writer process; not thread-safe (use from one thread).

    ``lock``: the buffer's lock (``buffer_lock.BufferLock``, taken by the caller), held
    until ``close`` releases it: the gateway's service and ``install-trust`` open the
    buffer so; a reader (tests, the bench) need not."""

    def __init__(self, path: Path, budget_bytes: int, *, lock: BufferLock | None = None
                 ) -> None:
        self.path = path
        self.budget_bytes = budget_bytes
        self._lock = lock
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()
        except sqlite3.Error as e:
            if self._lock is not None:
                self._lock.release()
            raise StorageError("buffer %s: %s" % (path, e)) from e
        self.used_bytes: int = row[0]
        self.writer: batch.BatchWriter | None = None
        self.boot = 0
        self.dropped_batches = 0  # since start, own and nodes' together
        self.dropped_readings = 0

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            self._lock.release()

    # -- the gateway's own chain -------------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def attach_writer(self, device: str, signer: Any, kid: bytes) -> batch.BatchWriter:
        """Restore the gateway's chain (seq, head) and count this boot (durably)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            stored_device = self._meta("device")
            if stored_device is not None and stored_device != device:
                self._db.execute("ROLLBACK")
                raise StorageError(
                    "buffer %s belongs to %s, not %s; use a new store.path for a new identity"
                    % (self.path, stored_device, device)
                )
            self.boot = int(self._meta("boot") or 0) + 1
            self._set_meta("boot", self.boot)
            self._set_meta("device", device)
            seq = int(self._meta("seq") or 0)
            head = bytes(self._meta("head") or batch.ZERO_HASH)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StorageError("buffer %s: %s" % (self.path, e)) from e
        self.writer = batch.BatchWriter(device, signer, kid, seq, head)
        return self.writer

    # -- writing -----------------------------------------------------------------------

    def commit(
        self,
        own: list[list[dict[int, Any]]] | None = None,
        relayed: list[Relayed] | None = None,
        timebase: int = batch.TIME_UNIX,
        node_states: dict[str, bytes] | None = None,
    ) -> DropReport:
        """Sign ``own`` record lists as batches, store them and ``relayed``: durable on return.

        ``node_states`` (device -> ``ChainState.to_bytes()``) is the relay's view of the
        nodes' chains after accepting ``relayed``, stored in the same transaction.

        Raises ``StorageError``; then nothing of this call is stored and the writer's chain
        state is as before.
        """
        own = own or []
        relayed = relayed or []
        w = self.writer
        if own and w is None:
            raise ValueError("attach_writer() before committing own batches")
        saved = (w.seq, w.head) if w is not None else (0, batch.ZERO_HASH)
        now = time.time()
        db = self._db
        used = self.used_bytes
        try:
            # signed inside the try: a signature that fails after others moved the chain
            # puts it back with everything else
            rows: list[tuple[str, int, int, int, int, float, bytes]] = []
            for records in own:
                assert w is not None
                data = w.sign(records, self.boot, timebase)
                rows.append((w.device, 1, w.seq, len(records), _size(data), now, data))
            for r in relayed:
                rows.append((r.device, 0, r.seq, r.readings, _size(r.data), now, r.data))
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO batches (device, own, seq, readings, size, created, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            used += sum(r[4] for r in rows)
            report = DropReport([], {})
            if used > self.budget_bytes:
                used, report = self._drop_oldest(used, now)
            for device, state in (node_states or {}).items():
                db.execute(
                    "INSERT OR REPLACE INTO node_chain (device, state) VALUES (?, ?)",
                    (device, state),
                )
            if w is not None and (w.seq, w.head) != saved:
                self._set_meta("seq", w.seq)
                self._set_meta("head", w.head)
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if w is not None:
                w.seq, w.head = saved
            if isinstance(e, sqlite3.Error):
                raise StorageError("buffer %s: %s" % (self.path, e)) from e
            raise
        self.used_bytes = used
        return report

    def _drop_oldest(self, used: int, now: float) -> tuple[int, DropReport]:
        """Delete oldest rows until the budget holds with room for one drop record."""
        db = self._db
        w = self.writer
        reserve = _size(bytes(320)) if w is not None else 0  # a signed drop record
        own_seqs: list[int] = []
        own_readings = 0
        nodes: dict[str, tuple[int, int]] = {}
        last_id = 0
        cursor = db.execute("SELECT id, device, own, seq, readings, size FROM batches ORDER BY id")
        for rid, device, is_own, seq, readings, size in cursor:
            if used + reserve <= self.budget_bytes:
                break
            last_id = rid
            used -= size
            if is_own:
                own_seqs.append(seq)
                own_readings += readings
            else:
                b, n = nodes.get(device, (0, 0))
                nodes[device] = (b + 1, n + readings)
        cursor.close()
        db.execute("DELETE FROM batches WHERE id <= ?", (last_id,))
        for device, (b, n) in nodes.items():
            db.execute(
                "INSERT INTO node_drops (device, batches, readings) VALUES (?, ?, ?)"
                " ON CONFLICT(device) DO UPDATE SET batches = batches + excluded.batches,"
                " readings = readings + excluded.readings",
                (device, b, n),
            )
        own: list[int] = []
        if own_seqs:
            assert w is not None
            own = [min(own_seqs), max(own_seqs), len(own_seqs), own_readings]
            data = w.sign([], self.boot, kind=batch.KIND_DROP, dropped=own)
            db.execute(
                "INSERT INTO batches (device, own, seq, readings, size, created, data)"
                " VALUES (?, 1, ?, 0, ?, ?, ?)",
                (w.device, w.seq, _size(data), now, data),
            )
            used += _size(data)
        self.dropped_batches += len(own_seqs) + sum(b for b, _ in nodes.values())
        self.dropped_readings += own_readings + sum(n for _, n in nodes.values())
        return used, DropReport(own, nodes)

    # -- forwarding --------------------------------------------------------------------

    def oldest(self, limit: int, after_id: int = 0) -> list[Stored]:
        """Up to ``limit`` buffered batches with id > ``after_id``, oldest first."""
        try:
            rows = self._db.execute(
                "SELECT id, device, data FROM batches WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        except sqlite3.Error as e:
            raise StorageError("buffer %s: %s" % (self.path, e)) from e
        return [Stored(i, d, bytes(b)) for i, d, b in rows]

    def delete(self, ids: list[int]) -> None:
        """Forget batches the broker acknowledged (PUBACK)."""
        if not ids:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            freed = 0
            for i in ids:
                row = db.execute("DELETE FROM batches WHERE id = ? RETURNING size", (i,)).fetchone()
                if row is not None:  # already dropped for the budget: nothing to free
                    freed += row[0]
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StorageError("buffer %s: %s" % (self.path, e)) from e
        self.used_bytes -= freed

    # -- status ------------------------------------------------------------------------

    def depth(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])

    def oldest_age_s(self, now: float | None = None) -> float:
        row = self._db.execute("SELECT MIN(created) FROM batches").fetchone()
        if row[0] is None:
            return 0.0
        return max(0.0, (now if now is not None else time.time()) - float(row[0]))

    def node_states(self) -> dict[str, bytes]:
        """The relay's chain state per node, as last committed."""
        rows = self._db.execute("SELECT device, state FROM node_chain").fetchall()
        return {d: bytes(b) for d, b in rows}

    def node_drops(self) -> dict[str, tuple[int, int]]:
        rows = self._db.execute("SELECT device, batches, readings FROM node_drops").fetchall()
        return {d: (b, n) for d, b, n in rows}


class CommandState:
    """The command gate's and responder's state (``get``/``set``, as on the device) in
    the buffer's ``meta`` table, under ``cmd:`` keys, as CBOR; each ``set`` is one durable
    transaction, so a seq taken is never taken again after a crash."""

    PREFIX = "cmd:"

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, key: str, default: Any = None) -> Any:
        value = self.store._meta(self.PREFIX + key)
        return default if value is None else cbor.loads(bytes(value))

    def set(self, **values: Any) -> None:
        db = self.store._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for key, value in values.items():
                self.store._set_meta(self.PREFIX + key, cbor.dumps(value))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StorageError("buffer %s: %s" % (self.store.path, e)) from e
