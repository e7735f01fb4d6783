"""Migration 0003 on SQLite and PostgreSQL, over a database holding 0002's data: devices
keep their rows (malformed 0, no gateway), PostgreSQL's columns widen to what the core
accepts (a 192-character name, 64-bit counts), the dead-letter table appears; downgrade
and upgrade again work."""

from __future__ import annotations

from sqlalchemy import inspect, text

from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine

from support.migrations import migrate_to

DEVICE = "urn:dev:mac:0024befffe800001"


def test_0003_upgrades_0002_data_and_downgrades(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0002")
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO device (serial, model, hardware_class, site, firmware_version, id,"
                " state, forgeries, created_at) VALUES ('SN-1', 'm', 'esp32', '', '', :id,"
                " 'active', 1, CURRENT_TIMESTAMP)"), {"id": DEVICE})
        migrate_to(engine, "0003")
        with engine.begin() as c:
            row = c.execute(text("SELECT malformed, gateway_id, forgeries FROM device")).one()
            assert tuple(row) == (0, None, 1)
            c.execute(text(
                "INSERT INTO reading (t, name, batch_seq, status, timebase, device_id)"
                " VALUES (1.0, :name, 1, 'ok', 0, :id)"), {"name": "n" * 192, "id": DEVICE})
            c.execute(text(
                "INSERT INTO ingest_event (device_id, at, status, missing, explained, detail)"
                " VALUES (:id, CURRENT_TIMESTAMP, 'gap', :big, :big, '')"),
                {"id": DEVICE, "big": 2**48 - 2})
        tables = inspect(engine).get_table_names()
        assert "ingest_dead_letter" in tables
        if engine.dialect.name == "postgresql":
            cols = {c["name"]: c["type"] for c in inspect(engine).get_columns("reading")}
            assert cols["name"].length == 192  # type: ignore[attr-defined]
            for table, column in (("chain_state", "missing"), ("chain_state", "forgotten"),
                                  ("ingest_event", "missing"),
                                  ("ingest_event", "explained")):
                types = {c["name"]: str(c["type"]) for c in inspect(engine).get_columns(table)}
                assert types[column] == "BIGINT", (table, column)
        with engine.begin() as c:  # 0002's columns cannot hold them: make room to go back
            c.execute(text("DELETE FROM reading"))
            c.execute(text("DELETE FROM ingest_event"))
        migrate_to(engine, "0002", down=True)
        assert "ingest_dead_letter" not in inspect(engine).get_table_names()
        assert "gateway_id" not in {c["name"] for c in inspect(engine).get_columns("device")}
        migrate_to(engine, "head")
        assert "gateway_id" in {c["name"] for c in inspect(engine).get_columns("device")}
    finally:
        engine.dispose()
