"""No false greens, no silent creation: which commands may create, migrate or only read the
fleet's database (``db.open_database``), run as an operator runs them (the ``cityedge``
command's entry point with only the environment and the working directory to go by, from
a folder of its own; in process, ``support.cli``), on SQLite and PostgreSQL.

Each test here failed before the rule existed: ``audit verify`` from another folder made an
empty SQLite file and said "intact: 0 rows" with exit 0; a mistyped URL made a new empty
database and served from it; a closed PostgreSQL port printed a driver traceback.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from cityedge_fleet.app import create_app
from cityedge_fleet.config import Settings
from cityedge_fleet.db import (
    DatabaseError,
    current_revision,
    head_revision,
    make_engine,
    migrate,
)
from cityedge_host.errors import EXIT_UNAVAILABLE

from support import cli
from support.migrations import migrate_to
from support.mosquitto import free_port
from support.pg import PgCluster

HEAVY_TRACE = "Traceback"


def cityedge(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, CITYEDGE_MODE="development", **env)
    return cli.run(args, full, cwd=cwd)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "export"],
                                     ["keys", "report"], ["keys", "campaigns"]])
def test_a_reader_in_another_folder_creates_nothing_and_says_which_database(
        command: list[str], tmp_path: Path) -> None:
    """The development default ``sqlite:///var/fleet.sqlite3`` is relative: run from a folder
    without a fleet, a reader fails (exit 3) naming the absolute file it looked for, and
    leaves the folder as it was (no database, no audit key)."""
    got = cityedge(command, tmp_path)
    assert got.returncode == EXIT_UNAVAILABLE, got.stderr
    assert "no fleet database at sqlite:///%s" % (tmp_path / "var" / "fleet.sqlite3") \
        in got.stderr
    assert "cityedge fleet init-db" in got.stderr and HEAVY_TRACE not in got.stderr
    assert got.stdout == ""
    assert files_under(tmp_path) == []


def test_audit_verify_of_an_empty_log_is_not_intact(db_url: str, tmp_path: Path) -> None:
    """A database just made by ``init-db`` has no audit rows: "intact: 0 rows" would be a
    false green for a fleet pointed at the wrong database, so it exits 3 unless told
    ``--allow-empty``; the database it read is named on stderr."""
    made = cityedge(["fleet", "init-db"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    assert made.returncode == 0, made.stderr
    assert "created" in made.stdout
    got = cityedge(["audit", "verify"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    assert got.returncode == EXIT_UNAVAILABLE, got.stderr
    assert "no rows: nothing was verified" in got.stderr and "intact" not in got.stdout
    exported = cityedge(["audit", "export"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    assert exported.returncode == EXIT_UNAVAILABLE and exported.stdout == ""
    allowed = cityedge(["audit", "verify", "--allow-empty"], tmp_path,
                       CITYEDGE_DATABASE_URL=db_url)
    assert allowed.returncode == 0, allowed.stderr
    assert "audit log intact: 0 rows" in allowed.stdout
    assert "database: " in allowed.stdout
    cityedge(["fleet", "create-token", "--name", "ops"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    got = cityedge(["audit", "verify"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    assert got.returncode == 0 and "audit log intact: 1 rows" in got.stdout


def test_a_reader_names_a_postgresql_database_with_its_password_masked(
        pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = make_url(pg_cluster.new_database()).set(password="s3cret-pw").render_as_string(
        hide_password=False)
    assert cityedge(["fleet", "init-db"], tmp_path, CITYEDGE_DATABASE_URL=url).returncode == 0
    got = cityedge(["audit", "verify", "--allow-empty"], tmp_path, CITYEDGE_DATABASE_URL=url)
    assert got.returncode == 0, got.stderr
    shown = make_url(url).render_as_string(hide_password=True)
    assert "database: %s" % shown in got.stdout
    assert "s3cret-pw" not in got.stderr + got.stdout


def test_a_reader_neither_creates_the_schema_nor_migrates(db_url: str, tmp_path: Path) -> None:
    """A database at an older revision is reported (exit 3, the revision named) and left at
    that revision: migrating is the writers' and ``init-db``'s job."""
    settings = Settings(mode="development", database_url=db_url, ca_dir=tmp_path)
    engine = make_engine(settings, create=True)
    try:
        migrate_to(engine, "0010")
        got = cityedge(["audit", "verify", "--allow-empty"], tmp_path,
                       CITYEDGE_DATABASE_URL=db_url)
        assert got.returncode == EXIT_UNAVAILABLE, got.stderr
        assert "revision 0010, not the newest" in got.stderr
        with engine.connect() as conn:
            assert current_revision(conn) == "0010"
    finally:
        engine.dispose()


def test_an_empty_postgresql_database_is_not_given_a_schema_unless_told(
        pg_cluster: PgCluster, tmp_path: Path) -> None:
    """A mistyped database name that happens to exist (an empty database) is refused by
    the service and by the writers; nothing is written into it."""
    url = pg_cluster.new_database()
    settings = Settings(mode="development", database_url=url, ca_dir=tmp_path,
                        audit_key_file=tmp_path / "audit.key",
                        command_key_file=tmp_path / "command.key")
    with pytest.raises(DatabaseError, match="has no fleet schema"):
        create_app(settings)
    got = cityedge(["fleet", "create-token", "--name", "ops"], tmp_path,
                   CITYEDGE_DATABASE_URL=url)
    assert got.returncode == EXIT_UNAVAILABLE and "has no fleet schema" in got.stderr
    assert got.stdout == ""  # no token printed for a database that does not keep it
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            assert current_revision(conn) is None
            assert conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = "
                                     "'public'")).scalar_one() == 0
    finally:
        engine.dispose()


def test_a_mistyped_sqlite_path_does_not_start_the_service(tmp_path: Path) -> None:
    """``fleet serve`` on a path with no database exits 3 before listening, naming the
    file; the file is not made. With ``--init-db`` it would be (see test_fleet_serve)."""
    wrong = tmp_path / "flet.sqlite3"
    got = cityedge(["fleet", "serve", "--no-ingest", "--port", str(free_port())], tmp_path,
                   CITYEDGE_DATABASE_URL="sqlite:///%s" % wrong)
    assert got.returncode == EXIT_UNAVAILABLE, got.stderr
    assert "no fleet database at sqlite:///%s" % wrong in got.stderr
    assert not wrong.exists()
    with pytest.raises(DatabaseError):
        create_app(Settings(mode="development", database_url="sqlite:///%s" % wrong,
                            ca_dir=tmp_path, audit_key_file=tmp_path / "audit.key",
                            command_key_file=tmp_path / "command.key"))
    assert not wrong.exists()


def test_init_db_refuses_a_database_that_holds_other_tables(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    got = cityedge(["fleet", "init-db"], tmp_path, CITYEDGE_DATABASE_URL="sqlite:///%s" % path)
    assert got.returncode == EXIT_UNAVAILABLE
    assert "holds other tables (invoices) but no fleet schema" in got.stderr


def test_init_db_is_idempotent_and_says_what_it_did(db_url: str, tmp_path: Path) -> None:
    first = cityedge(["fleet", "init-db"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    again = cityedge(["fleet", "init-db"], tmp_path, CITYEDGE_DATABASE_URL=db_url)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert ": created, schema " in first.stdout
    assert ": up to date, schema " in again.stdout


@pytest.mark.parametrize("command", [["fleet", "init-db"], ["fleet", "create-token", "--name",
                                                            "ops"],
                                     ["audit", "verify"], ["fleet", "ingest"]])
def test_an_unreachable_postgresql_is_one_line_naming_host_and_port(
        command: list[str], tmp_path: Path) -> None:
    """A closed port: the error names the database (password masked), host and port and
    what to check, in two lines (error and hint), never the driver's traceback."""
    port = free_port()  # nothing listens there
    url = "postgresql://fleet:pw-not-shown@127.0.0.1:%d/fleet" % port
    got = cityedge(command, tmp_path, CITYEDGE_DATABASE_URL=url,
                   CITYEDGE_MQTT_CA_FILE=str(tmp_path / "ca.pem"),
                   CITYEDGE_MQTT_CERT_FILE=str(tmp_path / "c.pem"),
                   CITYEDGE_MQTT_KEY_FILE=str(tmp_path / "k.pem"))
    assert got.returncode == EXIT_UNAVAILABLE, got.stderr
    errors = [ln for ln in got.stderr.splitlines() if not ln.startswith("cityedge fleet ")]
    assert len(errors) == 2, got.stderr
    assert errors[0].startswith("cityedge: cannot reach the database "
                                "postgresql://fleet:***@127.0.0.1:%d/fleet" % port)
    assert "127.0.0.1:%d" % port in errors[1] and "CITYEDGE_DATABASE_URL" in errors[1]
    assert "pw-not-shown" not in got.stderr and HEAVY_TRACE not in got.stderr


def test_writers_migrate_an_existing_fleet_database(db_url: str, tmp_path: Path) -> None:
    settings = Settings(mode="development", database_url=db_url, ca_dir=tmp_path,
                        audit_key_file=tmp_path / "audit.key")
    engine = make_engine(settings, create=True)
    try:
        migrate_to(engine, "0010")
        before, after = migrate(engine)  # an existing fleet database: no ``create`` needed
        assert (before, after) == ("0010", head_revision())
    finally:
        engine.dispose()


def test_fleet_ingest_with_no_broker_is_one_line_naming_host_and_port(tmp_path: Path) -> None:
    """``fleet ingest`` says what it runs against, then a closed broker port is one line
    (and its hint), not a ``ConnectionRefusedError`` without an address."""
    from support.mosquitto import TestPKI

    pki = TestPKI(tmp_path / "pki")
    ingest = pki.issue_client("fleet-ingest")
    db = "sqlite:///%s" % (tmp_path / "fleet.sqlite3")
    assert cityedge(["fleet", "init-db"], tmp_path, CITYEDGE_DATABASE_URL=db).returncode == 0
    port = free_port()
    got = cityedge(["fleet", "ingest"], tmp_path, CITYEDGE_DATABASE_URL=db,
                   CITYEDGE_MQTT_PORT=str(port), CITYEDGE_MQTT_CA_FILE=str(pki.ca_pem),
                   CITYEDGE_MQTT_CERT_FILE=str(ingest.cert_pem),
                   CITYEDGE_MQTT_KEY_FILE=str(ingest.key_pem))
    assert got.returncode == 1, got.stderr
    said = got.stderr.splitlines()
    assert said[:5] == ["cityedge fleet ingest: mode development",
                        "cityedge fleet ingest: database sqlite:///%s"
                        % (tmp_path / "fleet.sqlite3"),
                        "cityedge fleet ingest: CA directory %s" % (tmp_path / "var" / "ca"),
                        "cityedge fleet ingest: broker for devices mqtts://127.0.0.1:8883",
                        "cityedge fleet ingest: ingest from mqtts://127.0.0.1:%d (plain "
                        "subscriptions)" % port]
    assert len(said) == 6 and said[5].startswith(
        "cityedge: cannot reach the broker at 127.0.0.1:%d (Connection refused)" % port)
    assert HEAVY_TRACE not in got.stderr


@pytest.mark.parametrize("command", [["fleet", "serve", "--port", "70000"],
                                     ["fleet", "serve", "--port", "0"],
                                     ["broker", "config", "--out-dir", "b", "--certfile", "c",
                                      "--keyfile", "k", "--port", "65536"]])
def test_a_port_out_of_range_is_a_usage_error_before_anything_is_opened(
        command: list[str], tmp_path: Path) -> None:
    got = cityedge(command, tmp_path)
    assert got.returncode == 2, got.stderr
    assert "Invalid value for '--port'" in got.stderr
    assert files_under(tmp_path) == []
