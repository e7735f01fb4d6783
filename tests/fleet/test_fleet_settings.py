"""Settings: development defaults under var/, production refuses defaults; migrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect

from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine, migrate

ROOT = Path(__file__).resolve().parents[2]


def test_development_defaults_live_under_var(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODE", "DATABASE_URL", "CA_DIR", "BROKER_URL"):
        monkeypatch.delenv("CITYEDGE_" + name, raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.mode == "development"
    assert s.database_url == "sqlite:///var/fleet.sqlite3"
    assert s.ca_dir == Path("var/ca")


def test_production_refuses_default_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYEDGE_MODE", "production")
    monkeypatch.setenv("CITYEDGE_DATABASE_URL", "postgresql://fleet@db/fleet")
    with pytest.raises(ValidationError, match="CITYEDGE_CA_DIR, CITYEDGE_BROKER_URL"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("CITYEDGE_CA_DIR", "/srv/ca")
    monkeypatch.setenv("CITYEDGE_BROKER_URL", "mqtts://broker.city:8883")
    with pytest.raises(ValidationError, match="CITYEDGE_INGEST_SHARE_GROUP, "
                       "CITYEDGE_BROKER_CONTROL_CERT_FILE, CITYEDGE_BROKER_CONTROL_KEY_FILE, "
                       "CITYEDGE_AUDIT_KEY_FILE"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("CITYEDGE_INGEST_SHARE_GROUP", "ingest-7f3a9c21")
    monkeypatch.setenv("CITYEDGE_BROKER_CONTROL_CERT_FILE", "/srv/fleet-control.crt")
    monkeypatch.setenv("CITYEDGE_BROKER_CONTROL_KEY_FILE", "/srv/fleet-control.key")
    monkeypatch.setenv("CITYEDGE_AUDIT_KEY_FILE", "/srv/audit/audit.key")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.ca_dir == Path("/srv/ca")


def test_cli_reports_refused_settings_without_traceback(tmp_path: Path) -> None:
    env = {"CITYEDGE_MODE": "production", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "cityedge.cli", "audit", "verify"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("cityedge: fleet settings: production mode needs explicit")
    assert "Traceback" not in r.stderr


def test_migrations_create_every_table_and_are_idempotent(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(Settings(database_url=db_url, ca_dir=tmp_path))
    migrate(engine)
    migrate(engine)  # a second start is a no-op
    tables = set(inspect(engine).get_table_names())
    assert {"device", "device_tag", "credential", "api_token", "enrollment_token",
            "allowed_serial", "audit_record", "chain_state", "reading",
            "ingest_event", "alembic_version"} <= tables
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("device")}
    assert {"ix_device_state", "ix_device_hardware_class", "ix_device_site"} <= indexes
    engine.dispose()


def test_ingest_groups_must_fit_in_the_receive_window() -> None:
    from cityedge_fleet.config import FleetLimits

    with pytest.raises(ValidationError, match="ingest_receive_max"):
        FleetLimits(ingest_group_max_messages=600, ingest_receive_max=1000)
    assert FleetLimits(ingest_group_max_messages=500).ingest_receive_max == 1000
