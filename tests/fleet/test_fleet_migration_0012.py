"""Migration 0012 on SQLite and PostgreSQL: the OTA tables have exactly the models'
columns, unique constraints hold (one release per component and sequence, one member per
capability digest), downgrade drops them and upgrade works again."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from cityedge_fleet import ota_store
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine

from support.migrations import migrate_to

TABLES = {"ota_release": ota_store.OtaRelease, "ota_campaign": ota_store.OtaCampaign,
          "ota_member": ota_store.OtaMember}
RELEASE = ("INSERT INTO ota_release (component, version, sequence, hw_classes, size, sha256,"
           " manifest_sha256, manifest, key_list, keys_version, kid, expires_at, uploaded_by,"
           " uploaded_at) VALUES ('gateway', '1.0', :seq, '[]', 281474976710655, :h, :m, :b,"
           " :b, 1, 'k', CURRENT_TIMESTAMP, 'rm', CURRENT_TIMESTAMP)")


def test_0012_adds_the_ota_tables(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0011")
        assert not set(TABLES) & set(inspect(engine).get_table_names())
        migrate_to(engine, "0012")
        for name, model in TABLES.items():
            cols = {c["name"] for c in inspect(engine).get_columns(name)}
            assert cols == set(model.__table__.columns.keys()), name  # type: ignore[attr-defined]
        with engine.begin() as c:  # a 48-bit sequence and size fit
            c.execute(text(RELEASE), {"seq": 2**48 - 1, "h": "a" * 64, "m": "b" * 64,
                                      "b": b"x"})
        with pytest.raises(IntegrityError), engine.begin() as c:
            c.execute(text(RELEASE), {"seq": 2**48 - 1, "h": "a" * 64, "m": "c" * 64,
                                      "b": b"x"})
        migrate_to(engine, "0011", down=True)
        assert not set(TABLES) & set(inspect(engine).get_table_names())
        migrate_to(engine, "head")
        assert set(TABLES) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
