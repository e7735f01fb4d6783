"""Migration 0017 on SQLite and PostgreSQL: ``device.trust_version`` is added, empty for
the devices enrolled before it (none is counted as having installed a statement it was
not recorded handing out), takes a statement version, and downgrade removes it keeping
the devices."""

from __future__ import annotations

from sqlalchemy import inspect, text

from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine
from cityedge_fleet.models import Device

from support.migrations import migrate_to

DEVICE = ("INSERT INTO device (id, serial, model, hardware_class, site, firmware_version,"
          " gateway_id, state, forgeries, malformed, created_at) VALUES (:id, :id, 'm', 'h',"
          " 's', '', NULL, 'active', 0, 0, CURRENT_TIMESTAMP)")


def _columns(engine: object) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("device")}  # type: ignore[arg-type]


def test_0017_adds_the_statement_version_handed_out(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0016")
        assert "trust_version" not in _columns(engine)
        with engine.begin() as c:
            c.execute(text(DEVICE), {"id": "urn:dev:mac:01"})
        migrate_to(engine, "0017")
        table = Device.__table__  # type: ignore[attr-defined]
        assert _columns(engine) == set(table.columns.keys())
        with engine.begin() as c:
            assert c.execute(text("SELECT trust_version FROM device")).scalar_one() is None
            c.execute(text("UPDATE device SET trust_version = :v"), {"v": 2**48 - 1})
            assert c.execute(text("SELECT trust_version FROM device")).scalar_one() == 2**48 - 1
        migrate_to(engine, "0016", down=True)
        assert "trust_version" not in _columns(engine)
        with engine.begin() as c:
            assert c.execute(text("SELECT id FROM device")).scalar_one() == "urn:dev:mac:01"
        migrate_to(engine, "head")
        assert "trust_version" in _columns(engine)
    finally:
        engine.dispose()
