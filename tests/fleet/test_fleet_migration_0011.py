"""Migration 0011 on SQLite and PostgreSQL, over 0010's data: existing tokens keep working
with no vendor; models and reports can be stored; downgrade drops them and the column
(tokens kept) and upgrade works again."""

from __future__ import annotations

from sqlalchemy import inspect, text

from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine

from support.migrations import migrate_to


def test_0011_adds_vendors_models_and_reports(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0010")
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO api_token (name, role, token_hash, created_by, created_at,"
                " revoked, sites) VALUES ('old-vendor', 'vendor', :h, 'test',"
                " CURRENT_TIMESTAMP, false, '[]')"), {"h": "a" * 64})
        migrate_to(engine, "0011")
        with engine.begin() as c:
            assert c.execute(text("SELECT name, vendor FROM api_token")).all() == [
                ("old-vendor", None)]
            c.execute(text(
                "INSERT INTO model_registration (name, vendor, registered_by, registered_at)"
                " VALUES ('ce-air-1', 'acme', 'sec', CURRENT_TIMESTAMP)"))
            c.execute(text(
                "INSERT INTO hw_report (model, vendor, profile, met, counts,"
                " catalogue_version, tool_version, generated_at, sha256, size, uploaded_by,"
                " uploaded_at, report) VALUES ('ce-air-1', 'acme', 'city-baseline', true,"
                " '{}', 1, '0.1', CURRENT_TIMESTAMP, :h, 2, 'v', CURRENT_TIMESTAMP, '{}')"),
                {"h": "b" * 64})
            assert c.execute(text("SELECT model, met FROM hw_report")).all() == [
                ("ce-air-1", True)]
        indexes = {i["name"] for i in inspect(engine).get_indexes("hw_report")}
        assert indexes == {"ix_hw_report_model_profile", "ix_hw_report_vendor"}
        migrate_to(engine, "0010", down=True)
        tables = set(inspect(engine).get_table_names())
        assert not tables & {"model_registration", "hw_report"}
        assert "vendor" not in {c["name"] for c in inspect(engine).get_columns("api_token")}
        with engine.begin() as c:
            assert c.execute(text("SELECT name FROM api_token")).all() == [("old-vendor",)]
        migrate_to(engine, "head")
        assert {"model_registration", "hw_report"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
