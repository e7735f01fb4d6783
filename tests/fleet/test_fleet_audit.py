"""The audit log: editing, deleting or reordering any row in the database is detected by
`cityedge audit verify` (and the API), deleting the newest rows too (the anchor file);
the export re-verifies with the same rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, col, select

from cityedge_fleet import audit
from cityedge_fleet.models import AuditRecord, Role

from .conftest import Api, device_body


def _fill(api: Api, n: int = 6) -> None:
    for i in range(n):
        r = api.client.post("/devices", json=device_body(i),
                            headers=api.headers(Role.technician))
        assert r.status_code == 201


def _cli_verify(api: Api, anchor: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CITYEDGE_MODE="development",
               CITYEDGE_DATABASE_URL=api.settings.database_url,
               CITYEDGE_CA_DIR=str(api.settings.ca_dir))
    if anchor:
        env["CITYEDGE_AUDIT_ANCHOR_FILE"] = str(api.settings.audit_anchor_file)
    return subprocess.run([sys.executable, "-m", "cityedge.cli", "audit", "verify"], env=env,
                          capture_output=True, text=True, timeout=60)


TAMPER = {
    "edit": ["UPDATE audit_record SET outcome = 'denied' WHERE id = 3"],
    "delete": ["DELETE FROM audit_record WHERE id = 4"],
    "delete-last": ["DELETE FROM audit_record WHERE id = (SELECT max(id) FROM audit_record)"],
    "reorder": [  # swap the contents of rows 2 and 5, hashes and all
        "UPDATE audit_record SET id = -2 WHERE id = 2",
        "UPDATE audit_record SET id = 2 WHERE id = 5",
        "UPDATE audit_record SET id = 5 WHERE id = -2",
    ],
    "rehash-one": [  # edit and recompute that row's hash: the next row no longer links
        "UPDATE audit_record SET actor = 'mallory' WHERE id = 3",
    ],
}


def _tamper(api: Api, how: str) -> None:
    with api.engine.begin() as conn:
        for stmt in TAMPER[how]:
            conn.execute(text(stmt))
        if how == "rehash-one":
            row = conn.execute(text("SELECT * FROM audit_record WHERE id = 3")).mappings().one()
            new = audit.chain_hash(row["prev_hash"], audit.canonical_content(dict(row)))
            conn.execute(text("UPDATE audit_record SET hash = :h WHERE id = 3"), {"h": new})


@pytest.mark.parametrize("how", list(TAMPER))
def test_tampering_is_detected(api: Api, how: str) -> None:
    _fill(api)
    sec = api.headers(Role.security)
    before = api.client.get("/audit/verify", headers=sec).json()
    assert before["ok"] is True and before["rows"] >= 6
    _tamper(api, how)
    result = api.client.get("/audit/verify", headers=sec).json()
    assert result["ok"] is False and result["problems"], result
    if how == "delete-last":  # caught by the head anchored outside the database
        assert result["problems"] == ["row %d: anchored but missing (the log was truncated)"
                                      % before["rows"]]


def test_truncated_tail_is_detected_by_the_anchor_file(api: Api, tmp_path: Path) -> None:
    """Delete the newest rows: only the anchored head shows it, through the CLI too; a
    rolled-back append anchors nothing; without an anchor file the loss goes unseen."""
    _fill(api, 4)
    anchor = api.settings.audit_anchor_file
    assert anchor is not None
    lines = anchor.read_text().splitlines()
    with Session(api.engine) as s:
        last = s.exec(select(AuditRecord).order_by(col(AuditRecord.id).desc())).first()
        assert last is not None and lines[-1] == "%d %s" % (last.id, last.hash)
        audit.append(s, actor="t", action="rolled.back", outcome=audit.OK)
        s.rollback()
    assert anchor.read_text().splitlines() == lines
    assert _cli_verify(api).returncode == 0
    with api.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_record WHERE id > 2"))
    r = _cli_verify(api)
    assert r.returncode == 1 and "anchored but missing (the log was truncated)" in r.stderr
    unanchored = _cli_verify(api, anchor=False)
    assert unanchored.returncode == 0 and "warning: no CITYEDGE_AUDIT_ANCHOR_FILE" in (
        unanchored.stderr)


def test_cli_verify_exits_1_naming_the_rows(api: Api) -> None:
    _fill(api)
    assert _cli_verify(api).returncode == 0
    _tamper(api, "delete")
    r = _cli_verify(api)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith("row 5: expected id 4")
    assert "cityedge: audit log is broken" in r.stderr and "Traceback" not in r.stderr


def test_export_is_json_lines_that_verify(api: Api) -> None:
    _fill(api, 3)
    r = api.client.get("/audit/export", headers=api.headers(Role.security))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert len(rows) >= 3 and audit.verify_rows(rows).ok
    rows[1]["target"] = "elsewhere"
    assert not audit.verify_rows(rows).ok
