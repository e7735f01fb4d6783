"""Migration 0013 on SQLite and PostgreSQL: ``console_session`` has exactly the model's
columns, the device list's keyset indexes and ``ingest_event.at`` are there, a session
needs a real API token, and downgrade removes it all."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from cityedge_fleet.config import Settings
from cityedge_fleet.console.session import ConsoleSession
from cityedge_fleet.db import make_engine

from support.migrations import migrate_to

INDEXES = {"device": {"ix_device_state_id", "ix_device_site_id", "ix_device_model_id"},
           "ingest_event": {"ix_ingest_event_at"}}
SESSION = ("INSERT INTO console_session (id_hash, token_id, csrf, created_at, last_used,"
           " expires_at) VALUES (:h, :t, 'c', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP,"
           " CURRENT_TIMESTAMP)")


def _indexes(engine: object, table: str) -> set[str]:
    return {i["name"] for i in inspect(engine).get_indexes(table)}  # type: ignore[arg-type]


def test_0013_adds_console_sessions_and_the_list_indexes(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0012")
        assert "console_session" not in inspect(engine).get_table_names()
        migrate_to(engine, "0013")
        cols = {c["name"] for c in inspect(engine).get_columns("console_session")}
        assert cols == set(ConsoleSession.__table__.columns.keys())  # type: ignore[attr-defined]
        for table, names in INDEXES.items():
            assert names <= _indexes(engine, table), table
        with engine.begin() as c:
            c.execute(text("INSERT INTO api_token (name, role, sites, token_hash, created_by,"
                           " created_at, revoked) VALUES ('t', 'viewer', '[]', :h, 'x',"
                           " CURRENT_TIMESTAMP, false)"), {"h": "a" * 64})
            tid = c.execute(text("SELECT id FROM api_token")).scalar_one()
            c.execute(text(SESSION), {"h": "b" * 64, "t": tid})
        if engine.dialect.name == "sqlite":
            with engine.begin() as c:
                c.execute(text("PRAGMA foreign_keys = ON"))
        with pytest.raises(IntegrityError), engine.begin() as c:  # no such token
            c.execute(text(SESSION), {"h": "c" * 64, "t": tid + 100})
        migrate_to(engine, "0012", down=True)
        assert "console_session" not in inspect(engine).get_table_names()
        for table, names in INDEXES.items():
            assert not names & _indexes(engine, table), table
        migrate_to(engine, "head")
        assert "console_session" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
