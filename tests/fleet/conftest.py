"""Fixtures for the fleet tests: a CA, a throwaway PostgreSQL 15 cluster, and an API client
per database (``db`` is parametrized over SQLite and PostgreSQL).

PostgreSQL: one throwaway cluster per session (``pg.py``; the machine's own PostgreSQL is
never touched). Each test gets a fresh database (``CREATE DATABASE``), SQLite a fresh file.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cityedge_fleet.app import create_app
from cityedge_fleet.auth import create_api_token
from cityedge_fleet.ca import init_ca
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.models import Role

from . import pg
from .pg import PgCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        with pg.pg_cluster() as cluster:
            yield cluster
    except pg.PgError as e:
        pytest.fail(str(e))


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
                    audit_anchor_file=tmp_path / "audit.anchor",
                    audit_key_file=tmp_path / "audit.key",
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
