"""Fixtures for the fleet tests: a CA, a throwaway PostgreSQL 15 cluster, and an API client
per database (``db`` is parametrized over SQLite and PostgreSQL).

PostgreSQL: ``initdb`` refuses to run as root, so as root the cluster is created and run
as the ``postgres`` user (``runuser``) in a temporary directory it owns, listening on a
free loopback port and a socket in that directory. The machine's own PostgreSQL is never
touched. Each test gets a fresh database (``CREATE DATABASE``), SQLite a fresh file.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cityedge_fleet.app import create_app
from cityedge_fleet.auth import create_api_token
from cityedge_fleet.ca import init_ca
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.models import Role

from support.mosquitto import free_port


def _pg_bin() -> Path:
    """Debian's newest installed PostgreSQL server binaries (``make setup`` installs them)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_START_TIMEOUT_S = 30


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgCluster:
    dir: Path
    port: int
    _names: Iterator[int]

    def admin_url(self) -> str:
        return "postgresql://postgres@127.0.0.1:%d/postgres" % self.port

    def new_database(self) -> str:
        name = "fleet_test_%d" % next(self._names)
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s" % name)
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        pytest.fail("PostgreSQL 15 server binaries missing: apt-get install postgresql-15")
    base = Path(tempfile.mkdtemp(prefix="cityedge-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(base, pg.pw_uid, pg.pw_gid)
    port = free_port()
    subprocess.run(_as_postgres([str(initdb), "-D", str(data), "-U", "postgres", "-A", "trust",
                                 "--no-sync", "-E", "UTF8"]),
                   check=True, capture_output=True)
    opts = "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off" % (port, base)
    started = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts,
                                           "-l", str(base / "log"), "-w", "-t",
                                           str(PG_START_TIMEOUT_S), "start"]),
                             capture_output=True)
    if started.returncode != 0:
        log = (base / "log").read_text() if (base / "log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail("PostgreSQL did not start: %s %s" % (started.stderr.decode(), log))
    try:
        yield PgCluster(base, port, itertools.count(1))
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                                     "immediate", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def ca_dirs() -> Iterator[tuple[Path, Path]]:
    """(root_dir, online_dir) of a CA made once for the session."""
    base = Path(tempfile.mkdtemp(prefix="cityedge-ca-"))
    init_ca(base / "root", base / "online")
    yield base / "root", base / "online"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return "sqlite:///%s" % (tmp_path / "fleet.sqlite3")
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def settings(db_url: str, ca_dirs: tuple[Path, Path], tmp_path: Path) -> Settings:
    online = tmp_path / "ca"
    shutil.copytree(ca_dirs[1], online)  # revocations write this test's own CRL
    return Settings(mode="development", database_url=db_url, ca_dir=online,
                    broker_url="mqtts://127.0.0.1:8883", ingest_with_serve=False,
                    limits=FleetLimits(quarantine_after_forgeries=3))


class Api:
    """A TestClient plus tokens for each role."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.engine = client.app.state.engine  # type: ignore[attr-defined]
        self._tokens: dict[Role, str] = {}

    def token(self, role: Role) -> str:
        if role not in self._tokens:
            with Session(self.engine) as session:
                _, tok = create_api_token(session, name="test-%s" % role.value, role=role,
                                          created_by="test")
                session.commit()
            self._tokens[role] = tok
        return self._tokens[role]

    def headers(self, role: Role) -> dict[str, str]:
        return {"Authorization": "Bearer %s" % self.token(role)}


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    app = create_app(settings)
    with TestClient(app) as client:
        yield Api(client, settings)
    app.state.engine.dispose()


@pytest.fixture
def api_settings_engine(settings: Settings) -> Iterator[tuple[Settings, object]]:
    """Settings and a migrated engine, without an HTTP client."""
    from cityedge_fleet.db import make_engine, migrate

    engine = make_engine(settings)
    migrate(engine)
    yield settings, engine
    engine.dispose()


DEVICE = "urn:dev:mac:0024befffe804ff1"


def device_body(i: int = 1, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "urn:dev:mac:0024befffe80%04x" % i, "serial": "SN-%05d" % i,
        "model": "ce-air-1", "hardware_class": "esp32", "site": "harbour", "tags": ["air"],
    }
    body.update(extra)
    return body


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
