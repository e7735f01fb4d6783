"""The writes of one ingest transaction: chain states per device, readings in bulk.

The ingest commits many MQTT messages in one transaction (see ``ingest.Ingestor``). Within
it, ``ChainStates`` reads each device's chain state once (locked: ``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds the write lock) and
writes it once at ``flush`` (the state's CBOR coded by ``cbor2``); ``ReadingRows`` streams
the readings of every accepted batch into a ``COPY`` as the group is decided (PostgreSQL,
psycopg 3) or writes them with one ``executemany`` (SQLite). Both are flushed by the ingest
right before the commit, in the same transaction as the events and device updates, so a
crash loses all of a group or none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import cbor2
from sqlalchemy import Connection, event
from sqlmodel import Session, col, select

from cityedge_core.batch import TIME_UNIX
from cityedge_core.chain import ChainState
from cityedge_fleet.models import STREAM_TIME_MAX, ChainStateRow

log = logging.getLogger(__name__)
STREAM_ROWS = 1000  # readings buffered before they are sent into the COPY in progress
READING_COLUMNS = ("device_id", "t", "name", "unit", "value", "vs", "vb", "vd", "sum",
                   "batch_seq", "status", "timebase", "via")
ReadingRow = tuple[Any, ...]  # values in READING_COLUMNS order
_COLUMNS = "device_id, t, name, unit, value, vs, vb, vd, sum, batch_seq, status, timebase, via"
COPY_READINGS = "COPY reading (" + _COLUMNS + ") FROM STDIN"
INSERT_READINGS = (
    "INSERT INTO reading (" + _COLUMNS + ") "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# a stream already there is left as it is (another worker may add it at the same time:
# the keys go in sorted, so two transactions wait for each other's keys in one order)
INSERT_STREAMS = {
    "postgresql": "INSERT INTO reading_stream (device_id, name, status) VALUES (%s, %s, %s) "
                  "ON CONFLICT DO NOTHING",
    "sqlite": "INSERT INTO reading_stream (device_id, name, status) VALUES (?, ?, ?) "
              "ON CONFLICT DO NOTHING",
}
StreamKey = tuple[str, str, str]  # device_id, name, status
STREAMS_KNOWN_MAX = 100_000  # stream keys an ingest process remembers as written (then anew)


def stream_keys(rows: Iterable[ReadingRow]) -> set[StreamKey]:
    """The ``reading_stream`` keys of ``rows``: those of a reading with a UNIX time in
    ``0 .. STREAM_TIME_MAX`` and a numeric value (``models.ReadingStream``)."""
    return {(r[0], r[2], r[10]) for r in rows
             if r[4] is not None and r[11] == TIME_UNIX and 0.0 <= r[1] <= STREAM_TIME_MAX}


def state_to_bytes(state: ChainState) -> bytes:
    """``state.to_bytes()`` (the core's deterministic CBOR), encoded by ``cbor2`` in C: the
    state is lists of integers and byte strings, which both encode in their one shortest
    definite form (``tests/fleet/test_fleet_ingest_store.py`` holds them equal)."""
    return bytes(cbor2.dumps(state.to_list()))


def state_from_bytes(data: bytes) -> ChainState:
    """``ChainState.from_bytes`` decoded by ``cbor2``: the bytes are the service's own, read
    back from its database (written by ``state_to_bytes``), not peer input."""
    return ChainState.from_list(cbor2.loads(data))


class ChainStates:
    """The verifier's ``device -> ChainState`` mapping for one transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.rows: dict[str, ChainStateRow | None] = {}
        self.states: dict[str, ChainState] = {}
        self.dirty: set[str] = set()

    def prefetch(self, devices: Iterable[str]) -> None:
        """Read (and lock) the states of ``devices`` in one query, in a stable order."""
        want = sorted({d for d in devices if d not in self.rows})
        if not want:
            return
        query = (select(ChainStateRow).where(col(ChainStateRow.device_id).in_(want))
                 .order_by(col(ChainStateRow.device_id)).with_for_update())
        for row in self.session.exec(query):
            self.rows[row.device_id] = row
            self.states[row.device_id] = state_from_bytes(row.state)
        for device in want:
            self.rows.setdefault(device, None)

    def get(self, device: str) -> ChainState | None:
        if device not in self.rows:
            self.prefetch([device])
        return self.states.get(device)

    def __setitem__(self, device: str, state: ChainState) -> None:
        self.states[device] = state
        self.dirty.add(device)

    def flush(self) -> None:
        for device in sorted(self.dirty):
            state = self.states[device]
            row = self.rows.get(device)
            if row is None:
                row = ChainStateRow(device_id=device, state=b"", last_seq=0)
                self.rows[device] = row
            row.state = state_to_bytes(state)
            row.last_seq = state.last_seq
            row.missing = state.missing_count()
            row.forgotten = state.forgotten
            self.session.add(row)
        self.dirty.clear()


class ReadingRows:
    """The readings of one transaction.

    PostgreSQL: rows stream into a ``COPY`` while the group is still being decided (every
    ``STREAM_ROWS`` rows), so the server stores them while the ingest verifies the next
    batches instead of after; ``flush`` sends the rest and ends the ``COPY``. A ``COPY``
    holds the connection, so any other statement on it (an ORM flush, a key looked up)
    first ends the one in progress (a ``before_cursor_execute`` listener on the session's
    connection) and later rows open a new one, all in the same transaction. ``abort`` ends
    a ``COPY`` in progress with an error, so the transaction rolls back whole.

    SQLite: rows wait for ``flush``, one ``executemany``.
    """

    def __init__(self, session: Session, known: set[StreamKey] | frozenset[StreamKey] = frozenset()
                 ) -> None:
        self.session = session
        self.rows: list[ReadingRow] = []
        # stream keys of this group not in ``known`` (those the process wrote and saw
        # committed: ``Ingestor``); written at ``flush``
        self.known = known
        self.new_streams: set[StreamKey] = set()
        self._copy: Any = None  # psycopg.Copy in progress
        self._copy_exit: ExitStack | None = None
        self._conn: Connection | None = None
        self._dialect = session.get_bind().dialect.name
        self._pg = self._dialect == "postgresql"

    def extend(self, rows: list[ReadingRow]) -> None:
        self.new_streams |= stream_keys(rows) - self.known
        self.rows.extend(rows)
        if self._pg and len(self.rows) >= STREAM_ROWS:
            self._stream()

    def _stream(self) -> None:
        if self._copy is None:
            conn = self.session.connection()
            if self._conn is not conn:
                event.listen(conn, "before_cursor_execute", self._end_copy_first)
                self._conn = conn
            raw = conn.connection.driver_connection  # psycopg.Connection, same transaction
            assert raw is not None
            stack = ExitStack()
            cur = stack.enter_context(raw.cursor())
            self._copy = stack.enter_context(cur.copy(COPY_READINGS))
            self._copy_exit = stack
        write_row = self._copy.write_row
        for row in self.rows:
            write_row(row)
        self.rows = []

    def _end_copy_first(self, *_args: Any) -> None:
        self._end_copy(None)

    def _end_copy(self, error: BaseException | None) -> None:
        stack, self._copy_exit, self._copy = self._copy_exit, None, None
        if stack is not None:
            if error is None:
                stack.close()
            else:
                stack.__exit__(type(error), error, error.__traceback__)

    def flush(self) -> None:
        """Write every row still waiting (on PostgreSQL end the ``COPY``), then the new
        streams."""
        if self._pg:
            if self.rows:
                self._stream()
            self._end_copy(None)
        elif self.rows:
            self.session.connection().exec_driver_sql(INSERT_READINGS, self.rows)
            self.rows = []
        if self.new_streams:
            self.session.connection().exec_driver_sql(INSERT_STREAMS[self._dialect],
                                                      sorted(self.new_streams))

    def abort(self, error: BaseException) -> None:
        """End a ``COPY`` in progress with ``error`` (the transaction is rolled back)."""
        self.rows = []
        self.new_streams = set()
        try:
            self._end_copy(error)
        except Exception:  # the server refuses the failed COPY: expected, rolled back
            log.debug("COPY ended with an error", exc_info=True)
