"""The append-only, hash-chained audit log: who did what, when, from where, with what outcome.

Each row's ``hash`` is SHA-256 over the previous row's hash and the row's canonical content
(``canonical_content``: a JSON array of the fields in a fixed order, UTF-8, no spaces).
The first row chains from 64 zeros. ``verify`` recomputes the chain and reports every row
that was edited, deleted (a broken link), inserted or reordered; ``export_jsonl`` writes
the rows as JSON lines, which an auditor can re-verify with the same rule.

Deleting the newest rows leaves a valid, shorter chain: ``audit_anchor`` keeps the head
outside the database, and ``verify`` compares (when ``CITYEDGE_AUDIT_ANCHOR_FILE`` is set).

Appending takes the last row's hash, so two writers must not append at once: on
PostgreSQL ``append`` locks the table for the transaction; SQLite serialises writers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from cityedge_fleet import audit_anchor
from cityedge_fleet.models import AuditRecord, AuditVerifyResult

GENESIS = "0" * 64
OK = "ok"
DENIED = "denied"  # the caller lacked the right (wrong role, bad token)
REFUSED = "refused"  # the request was bad (reused token, malformed CSR, ...)
ERROR = "error"  # the service could not do it (a broker that could not be told, ...)


CONTENT_FIELDS = ("id", "at", "actor", "action", "target", "source", "outcome", "detail")


def canonical_content(row: AuditRecord | dict[str, Any]) -> bytes:
    data = row if isinstance(row, dict) else row.model_dump()
    fields = [data.get(name) for name in CONTENT_FIELDS]
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, content: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + content).hexdigest()


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    outcome: str,
    target: str = "",
    source: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditRecord:
    """Add one row to the chain in the session's transaction (the caller commits)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("LOCK TABLE audit_record IN EXCLUSIVE MODE"))
    last = session.exec(
        select(AuditRecord).order_by(col(AuditRecord.id).desc()).limit(1)
    ).first()
    prev_hash = last.hash if last is not None else GENESIS
    next_id = (last.id or 0) + 1 if last is not None else 1
    row = AuditRecord(
        id=next_id,
        at=_now_text(),
        actor=actor[:128],
        action=action,
        target=target[:256],
        source=source[:64],
        outcome=outcome,
        detail=json.dumps(detail or {}, sort_keys=True, separators=(",", ":")),
        prev_hash=prev_hash,
        hash="",
    )
    row.hash = chain_hash(prev_hash, canonical_content(row))
    session.add(row)
    session.flush()
    audit_anchor.remember(session, next_id, row.hash)
    return row


def record(session: Session, **fields: Any) -> AuditRecord:
    """Append one row and commit it at once (for outcomes that must survive a rollback)."""
    row = append(session, **fields)
    session.commit()
    return row


def verify_rows(rows: Iterable[AuditRecord | dict[str, Any]]) -> AuditVerifyResult:
    """Check ids are 1, 2, 3 ... and each hash links to the previous row and its content."""
    problems: list[str] = []
    prev = GENESIS
    expected_id = 1
    count = 0
    for row in rows:
        count += 1
        data = row if isinstance(row, dict) else row.model_dump()
        rid = data.get("id")
        if rid != expected_id:
            problems.append("row %s: expected id %d (a row was deleted or reordered)"
                            % (rid, expected_id))
        if data.get("prev_hash") != prev:
            problems.append("row %s: does not link to the row before it" % rid)
        try:
            ok = chain_hash(str(data.get("prev_hash")), canonical_content(data)) == data.get(
                "hash")
        except ValueError:  # prev_hash is not hex
            ok = False
        if not ok:
            problems.append("row %s: content does not match its hash (edited)" % rid)
        prev = str(data.get("hash"))
        expected_id = (rid if isinstance(rid, int) else expected_id) + 1
    return AuditVerifyResult(ok=not problems, rows=count, problems=problems)


def iter_rows(session: Session, batch: int = 1000) -> Iterator[AuditRecord]:
    after = 0
    while True:
        page = session.exec(
            select(AuditRecord).where(col(AuditRecord.id) > after)
            .order_by(col(AuditRecord.id)).limit(batch)
        ).all()
        if not page:
            return
        yield from page
        after = page[-1].id or after


def verify(session: Session) -> AuditVerifyResult:
    """``verify_rows`` over the database, and every anchored head still there (when the
    engine has an anchor file: ``audit_anchor``)."""
    anchor = audit_anchor.for_session(session)
    if anchor is None:
        return verify_rows(iter_rows(session))
    anchored, problems = anchor.read()
    seen: dict[int, str] = {}

    def rows() -> Iterator[AuditRecord]:
        for row in iter_rows(session):
            if row.id in anchored:
                seen[row.id] = row.hash
            yield row

    result = verify_rows(rows())
    for rid, anchored_hash in sorted(anchored.items()):
        got = seen.get(rid)
        if got is None:
            problems.append("row %d: anchored but missing (the log was truncated)" % rid)
        elif got != anchored_hash:
            problems.append("row %d: hash differs from the anchored one (rewritten)" % rid)
    problems = result.problems + problems
    return AuditVerifyResult(ok=not problems, rows=result.rows, problems=problems)


def export_jsonl(session: Session) -> Iterator[str]:
    for row in iter_rows(session):
        yield json.dumps(row.model_dump(), separators=(",", ":")) + "\n"
