"""The ``reading`` table in time partitions, and the retention job that keeps them.

On PostgreSQL ``reading`` is range-partitioned (declarative partitioning) on
``stored_at``, the server's clock when the ingest's transaction stored the row (its
default ``now()``), never the device's ``t``: a device's clock (skewed by hours, or
seconds since boot) neither decides where a row lands nor how long it is kept. Each
partition holds one day or one month (``reading_partition``), named
``reading_p<YYYYMMDD>`` after its first day; ``reading_default`` takes any row no
partition covers, so the ingest never fails when the job has not run (the job moves those
rows into their partition when it makes it). Migration 0014 attaches the table as it was
(``reading_legacy``: every row up to the end of the migration's day).

``maintain`` (``cityedge fleet retention``; run it daily, e.g. a systemd timer) makes the
partitions of the next ``reading_partitions_ahead`` periods and, with
``reading_retention_days`` > 0, drops every partition that ends before ``now -
retention`` (a ``DROP TABLE``: no row-by-row delete, no vacuum) and deletes the expired
rows of ``reading_default``. On SQLite ``reading`` stays one plain table and the job
deletes the expired rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)
PERIODS = ("day", "month")
DEFAULT_PARTITION = "reading_default"
LEGACY_PARTITION = "reading_legacy"
PREFIX = "reading_p"
_BOUND = re.compile(r"TO \('([^']+)'\)")
_NAME = re.compile(r"reading_p\d{8}")


@dataclass
class Report:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    deleted_rows: int = 0  # SQLite, or reading_default's expired rows
    moved_rows: int = 0  # rows moved from reading_default into a new partition


def period_start(at: dt.datetime, period: str) -> dt.datetime:
    """The start (UTC midnight) of the day or month holding ``at``."""
    at = at.astimezone(dt.UTC)
    day = dt.datetime(at.year, at.month, at.day, tzinfo=dt.UTC)
    return day if period == "day" else day.replace(day=1)


def next_start(start: dt.datetime, period: str) -> dt.datetime:
    if period == "day":
        return start + dt.timedelta(days=1)
    return (start.replace(year=start.year + 1, month=1) if start.month == 12
            else start.replace(month=start.month + 1))


def partition_name(start: dt.datetime) -> str:
    return PREFIX + start.strftime("%Y%m%d")


def partitions(conn: Connection) -> dict[str, dt.datetime | None]:
    """``reading``'s partitions on PostgreSQL and the end of each (None: the default)."""
    conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
    rows = conn.exec_driver_sql(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'reading'::regclass")
    found: dict[str, dt.datetime | None] = {}
    for name, bound in rows:
        m = _BOUND.search(bound or "")
        found[name] = (dt.datetime.fromisoformat(m.group(1)).astimezone(dt.UTC)
                       if m and m.group(1) else None)
    return found


def create_partition(conn: Connection, start: dt.datetime, end: dt.datetime) -> int:
    """Make ``reading_p<start>`` for ``[start, end)`` and move into it any row of
    ``reading_default`` in that range (in the caller's transaction). Returns the rows
    moved."""
    name = partition_name(start)
    if not _NAME.fullmatch(name):  # the name is made here, from a date: never input
        raise ValueError(name)
    lo, hi = start.isoformat(), end.isoformat()
    conn.exec_driver_sql(
        "CREATE TABLE %s (LIKE reading INCLUDING DEFAULTS INCLUDING CONSTRAINTS)" % name)
    move = ("WITH moved AS (DELETE FROM reading_default WHERE stored_at >= :lo AND "  # noqa: S608
            "stored_at < :hi RETURNING *) INSERT INTO %s SELECT * FROM moved" % name)
    moved = conn.execute(text(move), {"lo": lo, "hi": hi}).rowcount
    conn.exec_driver_sql("ALTER TABLE reading ATTACH PARTITION %s FOR VALUES FROM ('%s') "
                         "TO ('%s')" % (name, lo, hi))
    return max(moved or 0, 0)


def maintain(engine: Engine, *, period: str, ahead: int, retention_days: int,
             now: dt.datetime | None = None) -> Report:
    """Make the coming partitions and drop (delete, on SQLite) what retention expired."""
    if period not in PERIODS:
        raise ValueError("reading_partition is day or month, not %r" % period)
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(days=retention_days) if retention_days > 0 else None
    report = Report()
    with engine.begin() as conn:
        if conn.dialect.name != "postgresql":
            if cutoff is not None:
                report.deleted_rows = conn.execute(
                    text("DELETE FROM reading WHERE stored_at < :cutoff"),
                    {"cutoff": cutoff.replace(tzinfo=None).isoformat(" ")}).rowcount
            return report
        found = partitions(conn)
        ends = [e for e in found.values() if e is not None]
        start = max([period_start(now, period), *ends])  # covered up to here
        horizon = period_start(now, period)
        for _ in range(ahead + 1):  # this period and the next ``ahead``
            horizon = next_start(horizon, period)
        while start < horizon:  # a start off the period (the legacy end) ends with it
            end = next_start(period_start(start, period), period)
            report.moved_rows += create_partition(conn, start, end)
            report.created.append(partition_name(start))
            start = end
        if cutoff is not None:
            for name, until in sorted(found.items()):
                if until is not None and until <= cutoff and name != DEFAULT_PARTITION:
                    conn.exec_driver_sql("DROP TABLE %s" % _partition_ident(name))
                    report.dropped.append(name)
            report.deleted_rows = conn.execute(
                text("DELETE FROM reading_default WHERE stored_at < :cutoff"),
                {"cutoff": cutoff.isoformat()}).rowcount
    log.info("readings: partitions made %s, dropped %s, %d expired rows deleted, %d moved "
             "out of the default", report.created, report.dropped, report.deleted_rows,
             report.moved_rows)
    return report


def _partition_ident(name: str) -> str:
    """A partition name read from the catalogue, checked before it goes into DDL."""
    if name == LEGACY_PARTITION or _NAME.fullmatch(name):
        return name
    raise ValueError("not a reading partition: %r" % name)
