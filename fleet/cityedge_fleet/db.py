"""Database engine, sessions and migrations.

``make_engine`` opens SQLite (the embedded default; WAL, every transaction ``BEGIN
IMMEDIATE``) or PostgreSQL (rows locked with ``SELECT ... FOR UPDATE`` where it matters)
from the settings URL, with the settings' audit anchor file and audit key attached
(``audit_anchor``, ``audit_key``);
``migrate`` brings the schema to the newest Alembic revision (run at every start, a no-op
when up to date). ``SessionDep`` is the FastAPI dependency alias for a request's session.

A SQLite database file holds token hashes, the audit log and every reading: it is created
mode 0600 before SQLite opens it, and SQLite gives its ``-wal`` and
``-shm`` files the database file's mode; an existing file readable by others is tightened
to 0600, with a warning in the log.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from alembic import command
from alembic.config import Config
from fastapi import Depends, Request
from sqlalchemy import Engine, event
from sqlmodel import Session, create_engine

from cityedge_fleet import audit_anchor, audit_key
from cityedge_fleet.config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "alembic"
DB_FILE_MODE = 0o600  # owner only: SQLite copies it to the -wal and -shm files
log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event below opens transactions
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys = ON")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA busy_timeout = 5000")  # milliseconds to wait for a writer
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    """Take SQLite's write lock when a transaction starts, not at its first write.

    The chain state, the audit chain and one-time tokens are read, then updated; with
    pysqlite's deferred transactions two processes (say two ingest workers) could both
    read the same state and one update would be lost. Readers in WAL mode are not blocked.
    """
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def create_private_file(path: Path) -> None:
    """Make ``path`` exist with mode 0600 before SQLite opens it (the directory keeps the
    default mode: the development CA beside it must stay reachable for Mosquitto)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, DB_FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            log.warning("database %s was mode %04o (readable by others): now %04o",
                        path, mode, DB_FILE_MODE)
            os.fchmod(fd, DB_FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists() and stat.S_IMODE(side.stat().st_mode) & 0o077:
            side.chmod(DB_FILE_MODE)


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if settings.is_sqlite:
        path = sqlite_file(url)
        if path is not None:
            create_private_file(path)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    audit_anchor.attach(engine, settings.audit_anchor_file)
    audit_key.attach(engine, audit_key.from_settings(settings))
    return engine


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
