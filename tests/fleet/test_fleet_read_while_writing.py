"""On SQLite an API read does not wait for a writer: while another connection holds the
write lock (as a campaign batch does), GETs of the API, the metrics and readiness
answer from the WAL snapshot; a GET that is refused still writes its audit row (in a
transaction of its own, after the read one), and once the writer commits, the next read
sees its row. Real fleet app and database file; the writer is a second sqlite3
connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet.db import sqlite_file
from cityedge_fleet.models import AuditRecord, Role

from support.fleet import Api


@pytest.fixture
def writer(api: Api) -> Iterator[sqlite3.Connection]:
    """A second connection holding SQLite's write lock (``BEGIN IMMEDIATE``) until the
    test ends; ``busy_timeout`` 0: it never waits itself."""
    path = sqlite_file(api.settings.database_url)
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def _denied(api: Api) -> int:
    with Session(api.engine) as s:
        return len(s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "auth.login")).all())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_reads_answer_while_a_writer_holds_the_lock(api: Api,
                                                    writer: sqlite3.Connection) -> None:
    sec, mon = api.headers(Role.security), api.headers(Role.monitor)  # tokens stored first
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE api_token SET name = name")  # it has written, not committed
    for path, headers in (("/campaigns", sec), ("/devices", sec), ("/keys/report", sec),
                          ("/metrics", mon), ("/ready", {})):
        r = api.client.get(path, headers=headers)
        assert r.status_code in (200, 503), (path, r.status_code, r.text)
        assert "locked" not in r.text
    r = api.client.get("/campaigns", headers=sec)
    assert r.status_code == 200 and r.json() == []
    writer.execute("ROLLBACK")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refused_get_still_writes_its_audit_row(api: Api) -> None:
    before = _denied(api)
    r = api.client.get("/campaigns", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    assert _denied(api) == before + 1
    r = api.client.get("/campaigns", headers=api.headers(Role.security))
    assert r.status_code == 200
