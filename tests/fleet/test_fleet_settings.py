"""Settings: the mode is explicit, development defaults live under var/, production refuses
defaults, a clear-text broker and a missing audit anchor; no implicit .env; errors name the
variable; the SQLite file is private; migrations."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect, text

from cityedge_fleet.config import Settings, describe_errors
from cityedge_fleet.db import make_engine, migrate

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "CITYEDGE_MODE": "production",
    "CITYEDGE_DATABASE_URL": "postgresql://fleet@db/fleet",
    "CITYEDGE_CA_DIR": "/srv/ca",
    "CITYEDGE_BROKER_URL": "mqtts://broker.city:8883",
    "CITYEDGE_AUDIT_ANCHOR_FILE": "/var/lib/anchor/audit",
    "CITYEDGE_AUDIT_KEY_FILE": "/srv/audit/audit.key",
    "CITYEDGE_INGEST_SHARE_GROUP": "ingest-7f3a9c21",
    "CITYEDGE_BROKER_CONTROL_CERT_FILE": "/srv/fleet-control.crt",
    "CITYEDGE_BROKER_CONTROL_KEY_FILE": "/srv/fleet-control.key",
    "CITYEDGE_COMMAND_KEY_FILE": "/srv/keys/command.key",
    "CITYEDGE_COMMANDS_CERT_FILE": "/srv/fleet-commands.crt",
    "CITYEDGE_COMMANDS_KEY_FILE": "/srv/fleet-commands.key",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("CITYEDGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _problems(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as e:
        Settings()  # type: ignore[call-arg]
    return describe_errors(e.value)


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args],
                          env={"PATH": "/usr/bin:/bin", **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_development_defaults_live_under_var(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CITYEDGE_MODE", "development")
    s = Settings()  # type: ignore[call-arg]
    assert s.mode == "development"
    assert s.database_url == "sqlite:///var/fleet.sqlite3"
    assert s.ca_dir == Path("var/ca")
    assert s.trusted_proxies == []


def test_mode_must_be_set_and_named(clean_env: pytest.MonkeyPatch) -> None:
    assert _problems(clean_env) == [
        "CITYEDGE_MODE is not set: one of development, production"]
    assert _problems(clean_env, CITYEDGE_MODE="prod") == [
        "CITYEDGE_MODE is wrong: one of development, production"]


def test_production_refuses_defaults_clear_text_broker_and_no_anchor(
        clean_env: pytest.MonkeyPatch) -> None:
    [line] = _problems(clean_env, CITYEDGE_MODE="production",
                       CITYEDGE_DATABASE_URL="postgresql://fleet@db/fleet")
    assert "CITYEDGE_CA_DIR must be set explicitly" in line
    assert "CITYEDGE_BROKER_URL must be set explicitly" in line
    assert "CITYEDGE_AUDIT_ANCHOR_FILE must name an append-only file" in line
    for name in ("INGEST_SHARE_GROUP", "BROKER_CONTROL_CERT_FILE", "BROKER_CONTROL_KEY_FILE",
                 "AUDIT_KEY_FILE", "COMMAND_KEY_FILE", "COMMANDS_CERT_FILE",
                 "COMMANDS_KEY_FILE"):
        assert "CITYEDGE_%s must be set explicitly" % name in line
    assert "CITYEDGE_DATABASE_URL" not in line
    for name, value in PRODUCTION.items():
        clean_env.setenv(name, value)
    s = Settings()  # type: ignore[call-arg]
    assert s.ca_dir == Path("/srv/ca") and s.audit_anchor_file == Path("/var/lib/anchor/audit")
    [line] = _problems(clean_env, CITYEDGE_BROKER_URL="mqtt://broker.city:1883")
    assert line.startswith("CITYEDGE_BROKER_URL must be an mqtts:// URL in production")
    clean_env.setenv("CITYEDGE_BROKER_URL", PRODUCTION["CITYEDGE_BROKER_URL"])
    clean_env.delenv("CITYEDGE_AUDIT_ANCHOR_FILE")
    [line] = _problems(clean_env)
    assert line.startswith("CITYEDGE_AUDIT_ANCHOR_FILE must name an append-only file")


def test_errors_name_the_variable_of_nested_and_list_settings(
        clean_env: pytest.MonkeyPatch) -> None:
    lines = _problems(clean_env, CITYEDGE_MODE="development",
                      CITYEDGE_LIMITS__PAGE_MAX="many", CITYEDGE_TRUSTED_PROXIES="10.0.0.1,proxy")
    assert any(ln.startswith("CITYEDGE_LIMITS__PAGE_MAX: ") for ln in lines), lines
    assert any(ln.startswith("CITYEDGE_TRUSTED_PROXIES: ") and "'proxy' is not an IP" in ln
               for ln in lines), lines
    clean_env.setenv("CITYEDGE_LIMITS__PAGE_MAX", "50")
    clean_env.setenv("CITYEDGE_TRUSTED_PROXIES", " 10.0.0.1, 192.168.7.0/24,,2001:db8::/32")
    s = Settings()  # type: ignore[call-arg]
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.1/32", "192.168.7.0/24",
                                                   "2001:db8::/32"]


def test_a_dot_env_file_is_not_read_unless_named(tmp_path: Path) -> None:
    """A stray .env in the working directory used to switch the service's database and
    mode silently; now only CITYEDGE_ENV_FILE names a settings file, and it is said."""
    (tmp_path / ".env").write_text("CITYEDGE_MODE=development\n")
    r = _cli(["audit", "verify"], {}, tmp_path)
    assert r.returncode == 1, r.stdout
    assert r.stderr.strip() == ("cityedge: fleet settings: CITYEDGE_MODE is not set: one of "
                                "development, production")
    db = tmp_path / "from-file.sqlite3"
    named = tmp_path / "fleet.env"
    named.write_text("CITYEDGE_MODE=development\nCITYEDGE_DATABASE_URL=sqlite:///%s\n"
                     "CITYEDGE_AUDIT_KEY_FILE=%s\n" % (db, tmp_path / "audit.key"))
    r = _cli(["fleet", "init-db"], {"CITYEDGE_ENV_FILE": str(named)}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reading %s (CITYEDGE_ENV_FILE)" % named in r.stderr
    assert db.exists() and not (tmp_path / "var").exists()
    r = _cli(["audit", "verify"], {"CITYEDGE_ENV_FILE": str(tmp_path / "missing.env")},
             tmp_path)
    assert r.returncode == 1 and "CITYEDGE_ENV_FILE=%s: no such file" % (
        tmp_path / "missing.env") in r.stderr


def test_cli_reports_every_refused_setting_without_traceback(tmp_path: Path) -> None:
    r = _cli(["audit", "verify"], {"CITYEDGE_MODE": "production",
                                   "CITYEDGE_BROKER_URL": "mqtt://broker:1883"}, tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("cityedge: fleet settings: CITYEDGE_DATABASE_URL must be set")
    for name in ("CITYEDGE_CA_DIR", "CITYEDGE_BROKER_URL must be an mqtts://",
                 "CITYEDGE_AUDIT_ANCHOR_FILE"):
        assert name in r.stderr
    assert "Traceback" not in r.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_files_are_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    db = tmp_path / "data" / "fleet.sqlite3"
    old = os.umask(0o000)  # the worst case: what a service manager might leave
    try:
        engine = make_engine(Settings(mode="development", database_url="sqlite:///%s" % db,
                                      ca_dir=tmp_path), create=True)
        migrate(engine, create=True)
        with engine.connect() as conn:  # WAL mode: the -wal and -shm files exist while open
            conn.execute(text("SELECT count(*) FROM device"))
            sides = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
            assert all(p.exists() for p in sides)
            assert {p.name: _mode(p) for p in [db, *sides]} == {
                p.name: 0o600 for p in [db, *sides]}
        engine.dispose()
    finally:
        os.umask(old)


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite3"
    db.touch()
    db.chmod(0o644)
    engine = make_engine(Settings(mode="development", database_url="sqlite:///%s" % db,
                                  ca_dir=tmp_path), create=True)
    migrate(engine, create=True)
    engine.dispose()
    assert _mode(db) == 0o600


def test_migrations_create_every_table_and_are_idempotent(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url, ca_dir=tmp_path),
                         create=True)
    migrate(engine, create=True)
    migrate(engine)  # a second start is a no-op (and needs no create)
    tables = set(inspect(engine).get_table_names())
    assert {"device", "device_tag", "credential", "api_token", "enrollment_token",
            "allowed_serial", "audit_record", "chain_state", "reading",
            "ingest_event", "alembic_version"} <= tables
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("device")}
    assert {"ix_device_state", "ix_device_hardware_class", "ix_device_site"} <= indexes
    assert "sites" in {c["name"] for c in inspect(engine).get_columns("api_token")}
    engine.dispose()


def test_ingest_groups_must_fit_in_the_receive_window() -> None:
    from cityedge_fleet.config import FleetLimits

    with pytest.raises(ValidationError, match="ingest_receive_max"):
        FleetLimits(ingest_group_max_messages=600, ingest_receive_max=1000)
    assert FleetLimits(ingest_group_max_messages=500).ingest_receive_max == 1000
