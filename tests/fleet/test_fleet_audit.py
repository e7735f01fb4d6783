"""The audit log: editing, deleting or reordering any row in the database is detected by
`cityedge audit verify` (and the API), deleting the newest rows too (the anchor file), and
so is a database editor who rewrites the whole chain consistently (the rows are MACed with
a key outside the database); a deleted or emptied anchor is an error, not "intact"; rows
from before the key stay verifiable; the export re-verifies with the same rule, linkage
only without the key."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlmodel import Session, col, select

from cityedge_fleet import audit, audit_key
from cityedge_fleet.config import Settings
from cityedge_fleet.models import AuditRecord, Role

from support import cli
from support.fleet import Api, device_body


def _fill(api: Api, n: int = 6, start: int = 0) -> None:
    for i in range(start, start + n):
        r = api.client.post("/devices", json=device_body(i),
                            headers=api.headers(Role.technician))
        assert r.status_code == 201


def _cli(api: Api, *args: str, anchor: bool = True, key_file: Path | None = None,
         **env_extra: str) -> subprocess.CompletedProcess[str]:
    """``cityedge audit ARGS`` (in process, ``support.cli``), configured by environment as
    an operator would (the test's database, key file and, with ``anchor``, anchor file)."""
    env = dict(os.environ, CITYEDGE_MODE="development",
               CITYEDGE_DATABASE_URL=api.settings.database_url,
               CITYEDGE_CA_DIR=str(api.settings.ca_dir),
               CITYEDGE_AUDIT_KEY_FILE=str(key_file or api.settings.audit_key_file))
    env.update(env_extra)
    if anchor:
        env["CITYEDGE_AUDIT_ANCHOR_FILE"] = str(api.settings.audit_anchor_file)
    return cli.run(["audit", *args], env)


def _cli_verify(api: Api, anchor: bool = True) -> subprocess.CompletedProcess[str]:
    return _cli(api, "verify", anchor=anchor)


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


def test_export_is_json_lines_that_verify(api: Api, tmp_path: Path) -> None:
    """With the key an export is checked for authenticity; an auditor without it checks
    the linkage (a deleted row shows, an edited one needs the key)."""
    _fill(api, 3)
    r = api.client.get("/audit/export", headers=api.headers(Role.security))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    key = audit_key.load(api.settings.audit_key_file)
    assert len(rows) >= 3 and all(row["alg"] == key.alg for row in rows)
    assert audit.verify_rows(rows, key).ok
    linkage = audit.verify_rows(rows)
    assert linkage.ok and linkage.key_id is None and linkage.unauthenticated_rows == len(rows)
    edited = [dict(row) for row in rows]
    edited[1]["target"] = "elsewhere"
    assert audit.verify_rows(edited, key).problems == [
        "row 2: content does not match its MAC (edited, or written without the key)"]
    assert not audit.verify_rows(rows[:1] + rows[2:]).ok  # linkage alone sees a deletion
    export = tmp_path / "audit.jsonl"
    export.write_text("".join(json.dumps(row) + "\n" for row in edited))
    with_key = _cli(api, "verify", "--jsonl", str(export), anchor=False)
    assert with_key.returncode == 1 and "row 2: content does not match its MAC" in (
        with_key.stderr)
    assert "key %s: %d keyed rows checked" % (key.key_id, len(rows)) in with_key.stdout
    without = _cli(api, "verify", "--jsonl", str(export), "--without-key", anchor=False)
    assert without.returncode == 0, without.stderr
    assert "no key: linkage only; %d keyed rows not authenticated" % len(rows) in (
        without.stdout)


def _rewrite_whole_chain(api: Api, rule: str) -> None:
    """A database editor (direct SQL) rewrites every row consistently: the actor of every
    row becomes mallory and each hash is recomputed from the genesis on, by ``rule``:
    ``plain`` (the published SHA-256 rule, alg set to sha256), ``plain-keeping-alg`` (the
    same hashes, alg left as it was) or ``own-key`` (HMAC-SHA256 under a key of their own,
    labelled with the real key's id)."""
    fields = ("id", "at", "actor", "action", "target", "source", "outcome", "detail")
    own_key = b"m" * 32
    with api.engine.begin() as conn:
        rows = [dict(r) for r in conn.execute(
            text("SELECT * FROM audit_record ORDER BY id")).mappings()]
        prev = "0" * 64
        for row in rows:
            alg = "sha256" if rule == "plain" else row["alg"]
            content = [row[f] if f != "actor" else "mallory" for f in fields]
            if alg != "sha256":
                content.append(alg)
            data = bytes.fromhex(prev) + json.dumps(content, separators=(",", ":")).encode()
            new = hmac.new(own_key, data, hashlib.sha256).hexdigest() if rule == "own-key" \
                else hashlib.sha256(data).hexdigest()
            conn.execute(text("UPDATE audit_record SET actor = 'mallory', prev_hash = :p, "
                              "hash = :h, alg = :a WHERE id = :i"),
                         {"p": prev, "h": new, "a": alg, "i": row["id"]})
            prev = new


@pytest.mark.parametrize("rule", ["plain", "plain-keeping-alg", "own-key"])
def test_whole_chain_rewritten_by_a_database_editor_is_detected(api: Api, rule: str) -> None:
    """No anchor to help: the key alone shows the rewrite, through the API and the CLI."""
    _fill(api)
    assert _cli_verify(api, anchor=False).returncode == 0
    _rewrite_whole_chain(api, rule)
    r = _cli_verify(api, anchor=False)
    assert r.returncode == 1, r.stdout
    assert "cityedge: audit log is broken" in r.stderr and "Traceback" not in r.stderr
    key_id = audit_key.load(api.settings.audit_key_file).key_id
    assert "key %s" % key_id in r.stdout
    problems = api.client.get("/audit/verify", headers=api.headers(Role.security)).json()[
        "problems"]
    if rule == "plain":
        assert any("none of the" in p and "keyed by the configured key" in p
                   for p in problems), problems
    else:
        assert any("content does not match its MAC" in p for p in problems), problems
    # the key itself never shows
    secret = api.settings.audit_key_file.read_bytes().hex()
    assert secret not in r.stdout + r.stderr


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_deleted_or_emptied_anchor_is_an_error(api: Api, how: str) -> None:
    _fill(api, 3)
    anchor = api.settings.audit_anchor_file
    assert anchor is not None and anchor.read_text()
    ok = _cli_verify(api)
    assert ok.returncode == 0 and "anchor %s: " % anchor in ok.stdout
    if how == "deleted":
        anchor.unlink()
    else:
        anchor.write_text("")
    r = _cli_verify(api)
    assert r.returncode == 1, r.stdout
    assert "the audit anchor %s is %s but the log has" % (
        anchor, "missing" if how == "deleted" else "empty") in r.stderr
    assert "cityedge: audit log is broken" in r.stderr


def test_rows_from_before_the_key_stay_verifiable(api: Api, tmp_path: Path) -> None:
    """A log written before the fleet had a key: `init-key` makes the key and vouches for
    those rows (checked first); after that an edit of a legacy row, or a rewrite of the
    legacy prefix with the plain rule, is still caught."""
    audit_key.attach(api.engine, None)  # as the fleet ran before this change
    _fill(api, 3)
    new_key = tmp_path / "keys" / "audit.key"
    audit_key.create(tmp_path / "other.key")  # a reader makes no key: this one vouches nothing
    unvouched = _cli(api, "verify", key_file=tmp_path / "other.key", anchor=False)
    assert unvouched.returncode == 1
    assert "none of the" in unvouched.stderr and "audit init-key" in unvouched.stderr
    r = _cli(api, "init-key", key_file=new_key)
    assert r.returncode == 0, r.stderr
    assert "audit key created: %s" % new_key in r.stdout
    assert new_key.stat().st_mode & 0o777 == 0o600 and len(new_key.read_bytes()) == 32
    assert "vouches for the" in r.stdout
    again = _cli(api, "init-key", key_file=new_key)
    assert again.returncode == 0 and "exists: kept" in again.stdout
    assert "already has keyed rows" in again.stdout
    key = audit_key.load(new_key)
    audit_key.attach(api.engine, key)  # the fleet restarted with the key
    _fill(api, 1, start=10)
    ok = _cli(api, "verify", key_file=new_key)
    assert ok.returncode == 0, ok.stderr
    with Session(api.engine) as s:
        rows = list(audit.iter_rows(s))
    legacy = [row for row in rows if row.alg == "sha256"]
    assert len(legacy) >= 3 and rows[len(legacy)].action == "audit.key"
    assert "%d legacy rows" % len(legacy) in ok.stdout
    with api.engine.begin() as conn:
        conn.execute(text("UPDATE audit_record SET outcome = 'denied' WHERE id = 2"))
    edited = _cli(api, "verify", key_file=new_key)
    assert edited.returncode == 1 and "row 2: content does not match its hash" in (
        edited.stderr)
    with api.engine.begin() as conn:  # put it back, then rewrite the legacy prefix
        conn.execute(text("UPDATE audit_record SET outcome = :o WHERE id = 2"),
                     {"o": legacy[1].outcome})
    assert _cli(api, "verify", key_file=new_key).returncode == 0
    with api.engine.begin() as conn:
        prev = "0" * 64
        for row in legacy:
            data = dict(row.model_dump(), actor="mallory")
            new = audit.chain_hash(prev, audit.canonical_content(data))
            conn.execute(text("UPDATE audit_record SET actor = 'mallory', prev_hash = :p, "
                              "hash = :h WHERE id = :i"), {"p": prev, "h": new, "i": row.id})
            prev = new
    rewritten = _cli(api, "verify", key_file=new_key)
    assert rewritten.returncode == 1
    assert "row %d: does not link to the row before it" % (len(legacy) + 1) in (
        rewritten.stderr)
    assert "does not vouch for them" in rewritten.stderr


def test_a_new_development_key_vouches_for_the_rows_before_it(api: Api,
                                                               tmp_path: Path) -> None:
    """A development fleet makes its key at first start; its first keyed row vouches for
    the legacy rows (production keys come only from init-key)."""
    audit_key.attach(api.engine, None)
    _fill(api, 2)
    fresh = audit_key.load(tmp_path / "dev" / "audit.key", create_missing=True)
    assert fresh.created
    audit_key.attach(api.engine, fresh)
    _fill(api, 1, start=10)
    with Session(api.engine) as s:
        result = audit.verify(s)
        rows = list(audit.iter_rows(s))
    assert result.ok, result.problems
    assert [r.alg for r in rows].count("sha256") == result.legacy_rows >= 2
    assert rows[result.legacy_rows].action == "audit.key"


def test_the_key_file_is_checked(api: Api, tmp_path: Path) -> None:
    """Production needs the key named and present; a key open to others, or of the wrong
    size, is refused at start, with a message and no traceback."""
    with pytest.raises(ValidationError, match="CITYEDGE_AUDIT_KEY_FILE"):
        Settings(mode="production", database_url="postgresql://fleet@db/fleet",
                 ca_dir=Path("/srv/ca"), broker_url="mqtts://broker.city:8883")
    prod = {"CITYEDGE_MODE": "production", "CITYEDGE_BROKER_URL": "mqtts://b:8883",
            "CITYEDGE_INGEST_SHARE_GROUP": "ingest-7f3a9c21",
            "CITYEDGE_BROKER_CONTROL_CERT_FILE": "/srv/fleet-control.crt",
            "CITYEDGE_BROKER_CONTROL_KEY_FILE": "/srv/fleet-control.key",
            "CITYEDGE_COMMAND_KEY_FILE": "/srv/keys/command.key",
            "CITYEDGE_COMMANDS_CERT_FILE": "/srv/fleet-commands.crt",
            "CITYEDGE_COMMANDS_KEY_FILE": "/srv/fleet-commands.key"}
    missing = tmp_path / "nowhere.key"
    r = _cli(api, "verify", key_file=missing, **prod)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "the audit key %s does not exist: create it once with `cityedge audit init-key`" \
        % missing in r.stderr
    assert not missing.exists()  # production never makes a key by itself
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    r = _cli(api, "verify", key_file=loose)
    assert r.returncode == 1 and "is open to other users (mode 644): chmod 600" in r.stderr
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    r = _cli(api, "verify", key_file=short)
    assert r.returncode == 1 and "has 16 bytes, not 32" in r.stderr
