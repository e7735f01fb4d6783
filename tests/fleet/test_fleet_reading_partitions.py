"""Readings in time partitions (``reading_partitions``, migration 0014): on PostgreSQL the
ingest's COPY lands in the day's partition, rows older than the migration stay readable
in ``reading_legacy``, the retention job makes the coming partitions, moves rows the
default partition caught into the partition it makes for them, and drops expired
partitions whole; on SQLite it deletes the expired rows of the one table."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, inspect, text
from sqlmodel import Session

from cityedge_fleet import reading_partitions
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine, migrate
from cityedge_fleet.ingest_store import ReadingRows, stream_keys

from support.migrations import migrate_to
from support.pg import PgCluster

DAY = dt.timedelta(days=1)
ROW = ("urn:dev:mac:0001", 1.79e9, "t", "Cel", 21.5, None, None, None, None, 1, "ok", 0, None)
OLD = ("INSERT INTO reading (device_id, t, name, value, batch_seq, status, timebase) "
       "VALUES ('urn:dev:mac:0001', 1.7e9, 'old', 1.0, 1, 'ok', 0)")


def _store(engine: Engine, n: int) -> None:
    """``n`` rows through the ingest's own writer (a COPY on PostgreSQL)."""
    with Session(engine) as session:
        # the readings only: ``reading_stream`` (0016) may not be there yet
        rows = ReadingRows(session, known=stream_keys([ROW]))
        rows.extend([ROW] * n)
        rows.flush()
        session.commit()


def _count(engine: Engine, table: str = "reading") -> int:
    with engine.connect() as c:
        return int(c.execute(text("SELECT count(*) FROM %s" % table)).scalar_one())


def _parts(engine: Engine) -> dict[str, dt.datetime | None]:
    with engine.begin() as c:
        return reading_partitions.partitions(c)


def test_0014_keeps_every_reading_and_partitions_on_postgresql(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    pg = db_url.startswith("postgresql")
    try:
        migrate_to(engine, "0013")
        with engine.begin() as c:
            c.execute(text(OLD))
        migrate_to(engine, "0014")
        assert "stored_at" in {c["name"] for c in inspect(engine).get_columns("reading")}
        _store(engine, 5)
        assert _count(engine) == 6
        if pg:
            parts = _parts(engine)
            today = reading_partitions.period_start(dt.datetime.now(dt.UTC), "day")
            assert parts["reading_legacy"] == today + DAY  # the old rows, and today's
            assert "reading_default" in parts and parts["reading_default"] is None
            assert len([p for p in parts if p.startswith("reading_p")]) == 7
            assert _count(engine, "reading_legacy") == 6
        with engine.begin() as c:  # ids stay unique: one sequence for every partition
            ids = [r[0] for r in c.execute(text("SELECT id FROM reading"))]
        assert len(set(ids)) == 6
        migrate_to(engine, "0013", down=True)
        assert "stored_at" not in {c["name"] for c in inspect(engine).get_columns("reading")}
        assert _count(engine) == 6
        migrate_to(engine, "head")
        _store(engine, 1)
        assert _count(engine) == 7
    finally:
        engine.dispose()


def test_retention_drops_expired_partitions_and_makes_the_coming_ones(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    pg = db_url.startswith("postgresql")
    try:
        migrate(engine, create=True)
        _store(engine, 4)  # today: the legacy partition (the migration's day)
        now = dt.datetime.now(dt.UTC)
        # nothing expires with retention off; partitions run 30 days ahead
        report = reading_partitions.maintain(engine, period="day", ahead=30,
                                             retention_days=0)
        assert report.dropped == [] and report.deleted_rows == 0
        if pg:
            assert len(report.created) == 31 - 8  # today + 30 ahead; today + 7 were made
            assert max(e for e in _parts(engine).values() if e) == \
                reading_partitions.period_start(now, "day") + 31 * DAY
            again = reading_partitions.maintain(engine, period="day", ahead=30,
                                                retention_days=0)
            assert again.created == []  # idempotent
        # 40 days on, retention 30: today's rows expired
        later = now + 40 * DAY
        report = reading_partitions.maintain(engine, period="month", ahead=2,
                                             retention_days=30, now=later)
        assert _count(engine) == 0
        if pg:
            assert "reading_legacy" in report.dropped
            assert report.deleted_rows == 0
            parts = _parts(engine)
            assert "reading_legacy" not in parts
            assert all(e is None or e > later - 30 * DAY for e in parts.values())
            # monthly from where the daily ones end: the first month part ends on the 1st
            month = reading_partitions.period_start(later, "month")
            assert max(e for e in parts.values() if e) == reading_partitions.next_start(
                reading_partitions.next_start(reading_partitions.next_start(
                    month, "month"), "month"), "month")
        else:
            assert report.deleted_rows == 4
        _store(engine, 2)  # the ingest still stores
        assert _count(engine) == 2
    finally:
        engine.dispose()


def test_rows_the_default_caught_move_into_the_partition_made_for_them(
        pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    engine = make_engine(Settings(mode="development", database_url=url), create=True)
    try:
        migrate(engine, create=True)
        far = dt.datetime.now(dt.UTC) + 20 * DAY  # beyond the 7 days the migration made
        with engine.begin() as c:
            c.execute(text("INSERT INTO reading (device_id, t, name, batch_seq, status, "
                           "timebase, stored_at) VALUES ('urn:dev:mac:0001', 1.0, 'x', 1, "
                           "'ok', 0, :at)"), {"at": far})
        assert _count(engine, "reading_default") == 1
        report = reading_partitions.maintain(engine, period="day", ahead=3, retention_days=0,
                                             now=far)
        assert report.moved_rows == 1
        assert _count(engine, "reading_default") == 0
        assert _count(engine, reading_partitions.partition_name(
            reading_partitions.period_start(far, "day"))) == 1
    finally:
        engine.dispose()


def test_the_retention_command_reports_what_it_did(tmp_path: Path,
                                                   pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    key = tmp_path / "audit.key"
    engine = make_engine(Settings(mode="development", database_url=url,
                                  audit_key_file=key), create=True)
    migrate(engine, create=True)
    engine.dispose()
    env = dict(os.environ, CITYEDGE_MODE="development", CITYEDGE_DATABASE_URL=url,
               CITYEDGE_AUDIT_KEY_FILE=str(key), CITYEDGE_CA_DIR=str(tmp_path / "ca"),
               CITYEDGE_READING_PARTITIONS_AHEAD="9", CITYEDGE_READING_RETENTION_DAYS="30")
    r = subprocess.run([sys.executable, "-m", "cityedge.cli", "fleet", "retention"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    today = reading_partitions.period_start(dt.datetime.now(dt.UTC), "day")
    made = [reading_partitions.partition_name(today + k * DAY) for k in (8, 9)]  # up to today + 9
    assert r.stdout.splitlines()[0] == "partitions made: " + " ".join(made)
    assert "partitions dropped: none" in r.stdout


def test_a_device_clock_cannot_choose_where_its_readings_land_or_when_they_expire(
        pg_cluster: PgCluster) -> None:
    """Readings timed at 1970, at boot (timebase 1) and in 2286 all land in today's
    partition (the database's clock) and outlive a retention that counts from ``t``
    would have expired; they go when their stored day does."""
    url = pg_cluster.new_database()
    engine = make_engine(Settings(mode="development", database_url=url), create=True)
    try:
        migrate(engine, create=True)
        now = dt.datetime.now(dt.UTC)
        with Session(engine) as session:
            rows = ReadingRows(session)
            rows.extend([(*ROW[:1], t, *ROW[2:11], base, None)
                         for t, base in ((0.0, 0), (12.5, 1), (1e10, 0))])
            rows.flush()
            session.commit()
        assert _count(engine, "reading_legacy") == 3  # today's (the migration's day)
        report = reading_partitions.maintain(engine, period="day", ahead=1,
                                             retention_days=1, now=now)
        assert report.dropped == [] and _count(engine) == 3
        reading_partitions.maintain(engine, period="day", ahead=1, retention_days=1,
                                    now=now + 3 * DAY)
        assert _count(engine) == 0
    finally:
        engine.dispose()
