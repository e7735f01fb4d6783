"""Fixtures for the fleet tests: a CA, a throwaway PostgreSQL 15 cluster, and an API client
per database (``db`` is parametrized over SQLite and PostgreSQL).

PostgreSQL: one throwaway cluster per session (``pg.py``; the machine's own PostgreSQL is
never touched). Each test gets a fresh database (``CREATE DATABASE``), SQLite a fresh file.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cityedge_fleet.app import create_app
from cityedge_fleet.ca import init_ca
from cityedge_fleet.config import FleetLimits, Settings

from support import pg
from support.fleet import Api
from support.pg import PgCluster


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
                    command_key_file=tmp_path / "command.key",
                    limits=FleetLimits(quarantine_after_forgeries=3))


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    app = create_app(settings, init_db=True)
    with TestClient(app) as client:
        yield Api(client, settings)
    app.state.engine.dispose()


@pytest.fixture
def api_settings_engine(settings: Settings) -> Iterator[tuple[Settings, object]]:
    """Settings and a migrated engine, without an HTTP client."""
    from cityedge_fleet.db import make_engine, migrate

    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    yield settings, engine
    engine.dispose()


