"""A throwaway PostgreSQL cluster on a free loopback port (for the fleet tests and bench).

``initdb`` refuses to run as root, so as root the cluster is created and run as the
``postgres`` user (``runuser``) in a temporary directory it owns, listening on a free
loopback port and a socket in that directory. The machine's own PostgreSQL is never
touched. ``PgCluster.new_database`` makes a fresh database per test (or bench run).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from support.mosquitto import free_port

PG_START_TIMEOUT_S = 30


def _pg_bin() -> Path:
    """Debian's newest installed PostgreSQL server binaries (``make setup`` installs them)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgCluster:
    dir: Path
    port: int
    _names: Iterator[int]
    fsync: bool = False

    def admin_url(self) -> str:
        return "postgresql://postgres@127.0.0.1:%d/postgres" % self.port

    def new_database(self) -> str:
        name = "fleet_test_%d" % next(self._names)
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s" % name)
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (``fast``: open connections are cut;
        ``immediate``: every server process quits at once, as in a crash, and the next
        start replays the WAL)."""
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"),
                                     "-m", mode, "-w", "stop"]),
                       check=True, capture_output=True)

    def start(self) -> None:
        """Start the server again on the same port (after ``stop``)."""
        _start(self.dir, self.port, self.fsync)


class PgError(RuntimeError):
    """The PostgreSQL server binaries are missing or the cluster did not start."""


def _start(base: Path, port: int, fsync: bool) -> None:
    opts = "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=%s" % (
        port, base, "on" if fsync else "off")
    started = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(base / "data"),
                                           "-o", opts, "-l", str(base / "log"), "-w", "-t",
                                           str(PG_START_TIMEOUT_S), "start"]),
                             capture_output=True)
    if started.returncode != 0:
        log = (base / "log").read_text() if (base / "log").exists() else ""
        raise PgError("PostgreSQL did not start: %s %s" % (started.stderr.decode(), log))


@contextlib.contextmanager
def pg_cluster(fsync: bool = False) -> Iterator[PgCluster]:
    """A running cluster, stopped and deleted on exit. ``fsync=False`` for tests only."""
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        raise PgError("PostgreSQL server binaries missing: apt-get install postgresql-15")
    base = Path(tempfile.mkdtemp(prefix="cityedge-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(base, pg.pw_uid, pg.pw_gid)
    port = free_port()
    subprocess.run(_as_postgres([str(initdb), "-D", str(data), "-U", "postgres", "-A", "trust",
                                 "--no-sync", "-E", "UTF8"]),
                   check=True, capture_output=True)
    try:
        _start(base, port, fsync)
    except PgError:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield PgCluster(base, port, itertools.count(1), fsync)
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                                     "immediate", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
