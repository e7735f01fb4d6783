"""Database engine, sessions and migrations, and the rule of who may create a database.

``make_engine`` opens SQLite (the embedded default; WAL, every transaction ``BEGIN
IMMEDIATE``) or PostgreSQL (rows locked with ``SELECT ... FOR UPDATE`` where it matters)
from the settings URL, with the settings' audit anchor file and audit key attached
(``audit_anchor``, ``audit_key``);
``migrate`` brings the schema to the newest Alembic revision (run at every start, a no-op
when up to date). ``SessionDep`` is the FastAPI dependency alias for a request's session.

**A database is created only when told** (``open_database``): ``create`` (``cityedge fleet
init-db``, ``fleet serve --init-db``) makes the file or the schema; ``write`` (the service,
the commands that change things) upgrades an existing fleet database but refuses a missing
SQLite file or a database without the fleet's schema, so a mistyped
``CITYEDGE_DATABASE_URL`` stops the start instead of serving an empty fleet; ``read`` (audit
verify and export, reports) neither creates nor migrates, and wants the newest schema. A
database that cannot be reached is one line naming it (``describe_database``: the password
masked) and what to check, not a driver traceback. These are ``DatabaseError``s: the
``cityedge`` command exits ``EXIT_UNAVAILABLE`` (3) on them.

A SQLite database file holds token hashes, the audit log and every reading: it is created
mode 0600 before SQLite opens it, and SQLite gives its ``-wal`` and
``-shm`` files the database file's mode; an existing file readable by others is tightened
to 0600, with a warning in the log.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlmodel import create_engine

from cityedge_fleet import audit_anchor, audit_key
from cityedge_fleet.config import Settings
from cityedge_host.errors import EXIT_UNAVAILABLE, UserError

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


OpenFor = Literal["read", "write", "create"]
INIT_HINT = ("check CITYEDGE_DATABASE_URL (a relative sqlite path is relative to the "
             "working directory); for a new fleet run `cityedge fleet init-db` once")


class DatabaseError(UserError):
    """The configured database is missing, not a fleet database, or unreachable."""

    exit_code = EXIT_UNAVAILABLE
    hint = INIT_HINT


def describe_database(url: str) -> str:
    """The database URL as it may be printed: the password masked, a SQLite file's path
    made absolute (which file was opened is the question when it was the wrong one)."""
    path = sqlite_file(url)
    if url.startswith("sqlite") and path is not None:
        return "sqlite:///%s" % path.absolute()
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<an unparsable URL>"
    return shown.replace("postgresql+psycopg://", "postgresql://", 1)


def _where(url: str) -> str:
    """``host:port`` of a server database (what to check when it cannot be reached)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "?"
    return "%s:%s" % (parsed.host or "localhost", parsed.port or 5432)


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


def make_engine(settings: Settings, *, create: bool = False, read_only: bool = False
                ) -> Engine:
    """An engine on the configured database; a SQLite file that does not exist is made
    only with ``create`` (else ``DatabaseError``). ``read_only``: no audit key is attached
    (nor, in development, made): the caller attaches one."""
    url = settings.database_url
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if settings.is_sqlite:
        path = sqlite_file(url)
        if path is not None and not create and not _nonempty_file(path):
            raise DatabaseError("no fleet database at %s"
                                % describe_database(settings.database_url))
        if path is not None:
            create_private_file(path)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    audit_anchor.attach(engine, settings.audit_anchor_file)
    if not read_only:  # a reader loads it once the schema is checked (``open_database``)
        audit_key.attach(engine, audit_key.from_settings(settings))
    return engine


def _nonempty_file(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # the package ships its migrations
    return head


def current_revision(conn: Connection) -> str | None:
    """The schema's Alembic revision; None when the database has no fleet schema."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, *, create: bool = False) -> tuple[str | None, str]:
    """Upgrade the schema to the newest revision (idempotent): ``(before, after)``.

    A database without the fleet's schema gets it only with ``create``; one that holds
    other tables but no fleet schema is refused even then (not ours to write into)."""
    cfg = _alembic_config()
    label = describe_database(engine.url.render_as_string(hide_password=False))
    with _reachable(engine, label) as conn:
        before = current_revision(conn)
        if before is None:
            if not create:
                raise DatabaseError("%s has no fleet schema (an empty or another "
                                    "database)" % label)
            others = inspect(conn).get_table_names()
            if others:
                raise DatabaseError(
                    "%s holds other tables (%s) but no fleet schema: not initialised"
                    % (label, ", ".join(sorted(others)[:5])),
                    hint="give the fleet a database of its own in CITYEDGE_DATABASE_URL")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        return before, head_revision()


def check_schema(engine: Engine) -> str:
    """For a reader: the database has the fleet's newest schema (nothing is changed)."""
    label = describe_database(engine.url.render_as_string(hide_password=False))
    with _reachable(engine, label, begin=False) as conn:
        revision = current_revision(conn)
    if revision is None:
        raise DatabaseError("%s has no fleet schema (an empty or another database)" % label)
    if revision != head_revision():
        raise DatabaseError("%s has the schema of revision %s, not the newest (%s)"
                            % (label, revision, head_revision()),
                            hint="run `cityedge fleet init-db` (it migrates) with the "
                                 "fleet's settings, then try again")
    return revision


class _reachable:
    """A connection (in a transaction with ``begin``), or one ``DatabaseError`` line
    naming the database and where it should run instead of the driver's traceback."""

    def __init__(self, engine: Engine, label: str, begin: bool = True) -> None:
        self.engine, self.label, self.begin = engine, label, begin
        self._cm: Any = None

    def __enter__(self) -> Connection:
        try:
            self._cm = self.engine.begin() if self.begin else self.engine.connect()
            return self._cm.__enter__()  # type: ignore[no-any-return]
        except OperationalError as e:
            raise unreachable(self.engine.url.render_as_string(hide_password=False),
                              e) from e

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def unreachable(url: str, error: DBAPIError) -> DatabaseError:
    """One line for a database that did not answer: its masked URL and the driver's first
    line (for PostgreSQL: is it running on host:port, is the database name right)."""
    first = str(error.orig if error.orig is not None else error).strip().splitlines()
    reason = first[0] if first else type(error).__name__
    if url.startswith("sqlite"):
        return DatabaseError("cannot open the database %s: %s" % (describe_database(url),
                                                                   reason))
    return DatabaseError(
        "cannot reach the database %s: %s" % (describe_database(url), reason),
        hint="check that PostgreSQL runs and accepts connections on %s, and the user, "
             "password and database name in CITYEDGE_DATABASE_URL" % _where(url))


def open_database(settings: Settings, purpose: OpenFor) -> Engine:
    """The engine for ``purpose`` (see the module's docstring); never creates unless
    ``purpose`` is ``create``, never migrates when it is ``read``."""
    engine = make_engine(settings, create=purpose == "create", read_only=purpose == "read")
    try:
        if purpose == "read":
            check_schema(engine)
            audit_key.attach(engine, audit_key.load(settings.audit_key_file))
        else:
            migrate(engine, create=purpose == "create")
    except BaseException:
        engine.dispose()
        raise
    return engine

