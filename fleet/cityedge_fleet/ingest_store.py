"""The writes of one ingest transaction: chain states per device, readings in bulk.

The ingest commits many MQTT messages in one transaction (see ``ingest.Ingestor``). Within
it, ``ChainStates`` reads each device's chain state once (locked: ``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds the write lock) and
writes it once at ``flush``; ``ReadingRows`` collects the readings of every accepted batch
and writes them with one ``COPY`` (PostgreSQL, psycopg 3) or one ``executemany`` (SQLite).
Both are flushed by the ingest right before the commit, in the same transaction as the
events and device updates, so a crash loses all of a group or none of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlmodel import Session, col, select

from cityedge_core.chain import ChainState
from cityedge_fleet.models import ChainStateRow

READING_COLUMNS = ("device_id", "t", "name", "unit", "value", "vs", "vb", "vd", "sum",
                   "batch_seq", "status", "timebase", "via")
ReadingRow = tuple[Any, ...]  # values in READING_COLUMNS order
_COLUMNS = "device_id, t, name, unit, value, vs, vb, vd, sum, batch_seq, status, timebase, via"
COPY_READINGS = "COPY reading (" + _COLUMNS + ") FROM STDIN"
INSERT_READINGS = (
    "INSERT INTO reading (" + _COLUMNS + ") "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


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
            self.states[row.device_id] = ChainState.from_bytes(row.state)
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
            row.state = state.to_bytes()
            row.last_seq = state.last_seq
            row.missing = state.missing_count()
            row.forgotten = state.forgotten
            self.session.add(row)
        self.dirty.clear()


class ReadingRows:
    """Readings waiting for the end of the transaction, written in one statement."""

    def __init__(self) -> None:
        self.rows: list[ReadingRow] = []

    def extend(self, rows: list[ReadingRow]) -> None:
        self.rows.extend(rows)

    def flush(self, session: Session) -> None:
        if not self.rows:
            return
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            raw = conn.connection.driver_connection  # psycopg.Connection, same transaction
            assert raw is not None
            with raw.cursor() as cur, cur.copy(COPY_READINGS) as copy:
                for row in self.rows:
                    copy.write_row(row)
        else:
            conn.exec_driver_sql(INSERT_READINGS, self.rows)
        self.rows = []
