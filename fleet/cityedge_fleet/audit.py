"""The append-only, chained audit log: who did what, when, from where, with what outcome.

Each row's ``hash`` is HMAC-SHA256, under the key outside the database (``audit_key``),
over the previous row's hash and the row's canonical content (``canonical_content``: a JSON
array of the fields in a fixed order, its ``alg`` last, UTF-8, no spaces); ``alg`` names
the rule and the key (``hmac-sha256:<key id>``). The first row chains from 64 zeros.

Rows written before the fleet had a key are *legacy* rows (``alg`` ``sha256``: plain
SHA-256 of the same bytes without ``alg``). They are kept as they are and verify as they
did, but only as a prefix that a keyed row vouches for: ``cityedge audit init-key`` (or a
development fleet that creates its key at start) appends an ``audit.key`` row, keyed,
recording how many legacy rows precede it and the last one's hash. ``verify`` with the key
then refuses (the database editor's moves):

- a row whose MAC does not verify, or keyed by another key (an edit, a forgery);
- a legacy row after a keyed one (a downgrade to the plain rule);
- legacy rows that no ``audit.key`` row vouches for, and a log with rows but none keyed
  (the whole chain rewritten with plain SHA-256);
- and, as before, ids that are not 1, 2, 3 ... and rows that do not link to the previous
  one (deleted, inserted, reordered rows).

Without the key (an auditor with an export) ``verify_rows`` checks the linkage, the order
and the legacy rows' hashes; keyed rows' authenticity needs the key.

Deleting the newest rows leaves a valid, shorter chain: ``audit_anchor`` keeps the head
outside the database, and ``verify`` compares (when ``CITYEDGE_AUDIT_ANCHOR_FILE`` is set;
a configured anchor that is missing or empty while the log has rows is a problem).

Appending takes the last row's hash, so two writers must not append at once: on
PostgreSQL ``append`` locks the table for the transaction; SQLite serialises writers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from cityedge_fleet import audit_anchor, audit_key
from cityedge_fleet.audit_key import AuditKey
from cityedge_fleet.instruments import count_audit
from cityedge_fleet.models import AuditRecord, AuditVerifyResult

GENESIS = "0" * 64
OK = "ok"
DENIED = "denied"  # the caller lacked the right (wrong role, bad token)
REFUSED = "refused"  # the request was bad (reused token, malformed CSR, ...)
ERROR = "error"  # the service could not do it (a broker that could not be told, ...)

LEGACY_ALG = "sha256"  # rows written before the fleet had an audit key
KEY_ACTION = "audit.key"  # the keyed row that vouches for the legacy rows before it

CONTENT_FIELDS = ("id", "at", "actor", "action", "target", "source", "outcome", "detail")


def canonical_content(row: AuditRecord | dict[str, Any]) -> bytes:
    data = row if isinstance(row, dict) else row.model_dump()
    fields = [data.get(name) for name in CONTENT_FIELDS]
    alg = data.get("alg") or LEGACY_ALG
    if alg != LEGACY_ALG:  # legacy rows hash exactly the bytes they always did
        fields.append(alg)
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, content: bytes) -> str:
    """The legacy rule: plain SHA-256 (anyone can recompute it)."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + content).hexdigest()


def chain_mac(key: AuditKey, prev_hash: str, content: bytes) -> str:
    """The keyed rule: HMAC-SHA256 under the audit key."""
    return hmac.new(key.secret, bytes.fromhex(prev_hash) + content, hashlib.sha256).hexdigest()


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _last_row(session: Session) -> AuditRecord | None:
    return session.exec(
        select(AuditRecord).order_by(col(AuditRecord.id).desc()).limit(1)
    ).first()


def _add(session: Session, last: AuditRecord | None, key: AuditKey | None,
         **fields: Any) -> AuditRecord:
    prev_hash = last.hash if last is not None else GENESIS
    row = AuditRecord(id=(last.id or 0) + 1 if last is not None else 1, at=_now_text(),
                      prev_hash=prev_hash, hash="",
                      alg=key.alg if key is not None else LEGACY_ALG, **fields)
    content = canonical_content(row)
    row.hash = chain_mac(key, prev_hash, content) if key is not None else chain_hash(
        prev_hash, content)
    session.add(row)
    session.flush()
    return row


def _vouch_row(session: Session, last: AuditRecord, key: AuditKey,
               actor: str) -> AuditRecord:
    """The keyed row that vouches for the legacy rows up to ``last``."""
    return _add(session, last, key, actor=actor, action=KEY_ACTION, target=key.key_id,
                source="local", outcome=OK,
                detail=json.dumps({"key_id": key.key_id, "legacy_rows": last.id,
                                   "legacy_head": last.hash},
                                  sort_keys=True, separators=(",", ":")))


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
    last = _last_row(session)
    key = audit_key.for_session(session)
    if key is not None and key.created and last is not None:
        # a development fleet that made its key at this start: its first keyed row
        # vouches for the rows written before (production keys come from init-key);
        # once a keyed row is seen committed, never again
        if last.alg == LEGACY_ALG:
            last = _vouch_row(session, last, key, "fleet")
        else:
            key.created = False
    row = _add(session, last, key, actor=actor[:128], action=action, target=target[:256],
               source=source[:64], outcome=outcome,
               detail=json.dumps(detail or {}, sort_keys=True, separators=(",", ":")))
    audit_anchor.remember(session, row.id or 0, row.hash)
    count_audit(action, outcome)
    return row


def record(session: Session, **fields: Any) -> AuditRecord:
    """Append one row and commit it at once (for outcomes that must survive a rollback)."""
    row = append(session, **fields)
    session.commit()
    return row


def vouch_for_legacy(session: Session, key: AuditKey, actor: str) -> AuditRecord | None:
    """Introduce ``key`` to a log written before it: check the legacy rows, then append
    the keyed ``audit.key`` row vouching for them (None: nothing to vouch for). Raises
    ``ValueError`` naming the problems if the log is broken or already keyed."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE audit_record IN EXCLUSIVE MODE"))
    last = _last_row(session)
    if last is None:
        return None
    if last.alg != LEGACY_ALG:
        raise ValueError("the audit log already has keyed rows: nothing to vouch for")
    result = verify_rows(iter_rows(session), None)
    if not result.ok:
        raise ValueError("; ".join(result.problems))
    row = _vouch_row(session, last, key, actor)
    audit_anchor.remember(session, row.id or 0, row.hash)
    return row


class _ChainCheck:
    """``verify_rows``'s state, one row at a time (the rules are in the module docstring)."""

    def __init__(self, key: AuditKey | None) -> None:
        self.key = key
        self.problems: list[str] = []
        self.prev = GENESIS
        self.expected_id = 1
        self.rows = self.keyed = self.legacy = 0

    def feed(self, data: dict[str, Any]) -> None:
        self.rows += 1
        rid = data.get("id")
        if rid != self.expected_id:
            self.problems.append("row %s: expected id %d (a row was deleted or reordered)"
                                 % (rid, self.expected_id))
        if data.get("prev_hash") != self.prev:
            self.problems.append("row %s: does not link to the row before it" % rid)
        alg = data.get("alg") or LEGACY_ALG
        if alg == LEGACY_ALG:
            self._legacy(rid, data)
        elif isinstance(alg, str) and alg.startswith(audit_key.ALG_PREFIX):
            self._keyed(rid, data, alg.removeprefix(audit_key.ALG_PREFIX))
        else:
            self.problems.append("row %s: unknown alg %r" % (rid, alg))
        self.prev = str(data.get("hash"))
        self.expected_id = (rid if isinstance(rid, int) else self.expected_id) + 1

    def _legacy(self, rid: Any, data: dict[str, Any]) -> None:
        if self.keyed:
            self.problems.append("row %s: a plain SHA-256 row after keyed rows (rewritten "
                                 "without the key)" % rid)
        else:
            self.legacy += 1
        try:
            ok = chain_hash(str(data.get("prev_hash")), canonical_content(data)) == data.get(
                "hash")
        except ValueError:  # prev_hash is not hex
            ok = False
        if not ok:
            self.problems.append("row %s: content does not match its hash (edited)" % rid)

    def _keyed(self, rid: Any, data: dict[str, Any], key_id: str) -> None:
        if not self.keyed and self.legacy:
            self._check_vouch(rid, data)
        self.keyed += 1
        if self.key is None:
            return  # linkage only: authenticity needs the key
        if key_id != self.key.key_id:
            self.problems.append("row %s: keyed by key %s, not by the configured key %s"
                                 % (rid, key_id, self.key.key_id))
            return
        try:
            mac = chain_mac(self.key, str(data.get("prev_hash")), canonical_content(data))
        except ValueError:  # prev_hash is not hex
            mac = ""
        if not hmac.compare_digest(mac, str(data.get("hash"))):
            self.problems.append("row %s: content does not match its MAC (edited, or "
                                 "written without the key)" % rid)

    def _check_vouch(self, rid: Any, data: dict[str, Any]) -> None:
        """The first keyed row after legacy rows must vouch for exactly those rows."""
        try:
            detail = json.loads(str(data.get("detail")))
        except ValueError:
            detail = None
        if data.get("action") != KEY_ACTION or not isinstance(detail, dict) or \
                detail.get("legacy_rows") != self.legacy or \
                detail.get("legacy_head") != self.prev:
            self.problems.append(
                "rows 1..%d: not keyed, and row %s does not vouch for them as an %s row "
                "(written before the key existed without `cityedge audit init-key`, or "
                "rewritten without the key)" % (self.legacy, rid, KEY_ACTION))

    def result(self) -> AuditVerifyResult:
        if self.key is not None and self.rows and not self.keyed:
            self.problems.append(
                "none of the %d rows is keyed by the configured key %s: the log was "
                "rewritten without the key, or written before it (then run `cityedge "
                "audit init-key` once to vouch for it)" % (self.rows, self.key.key_id))
        return AuditVerifyResult(
            ok=not self.problems, rows=self.rows, problems=self.problems,
            key_id=self.key.key_id if self.key is not None else None,
            keyed_rows=self.keyed, legacy_rows=self.legacy,
            unauthenticated_rows=self.keyed if self.key is None else 0)


def verify_rows(rows: Iterable[AuditRecord | dict[str, Any]],
                key: AuditKey | None = None) -> AuditVerifyResult:
    """Check ids are 1, 2, 3 ..., each row links to the previous one, legacy rows match
    their SHA-256 and precede the keyed rows that vouch for them, and (with ``key``) each
    keyed row's MAC. Without ``key`` keyed rows are checked for linkage only."""
    check = _ChainCheck(key)
    for row in rows:
        check.feed(row if isinstance(row, dict) else row.model_dump())
    return check.result()


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
    """``verify_rows`` over the database with the engine's key (``audit_key``), and every
    anchored head still there (when the engine has an anchor file: ``audit_anchor``)."""
    key = audit_key.for_session(session)
    anchor = audit_anchor.for_session(session)
    if anchor is None:
        return verify_rows(iter_rows(session), key)
    anchored, problems = anchor.read()
    seen: dict[int, str] = {}

    def rows() -> Iterator[AuditRecord]:
        for row in iter_rows(session):
            if row.id in anchored:
                seen[row.id] = row.hash
            yield row

    result = verify_rows(rows(), key)
    if result.rows and not anchored:
        problems.append(
            "the audit anchor %s is %s but the log has %d rows: it was %s (or the anchor "
            "was configured after those rows: the next audited action starts it)"
            % (anchor.path, "empty" if anchor.path.exists() else "missing", result.rows,
               "emptied" if anchor.path.exists() else "deleted"))
    for rid, anchored_hash in sorted(anchored.items()):
        got = seen.get(rid)
        if got is None:
            problems.append("row %d: anchored but missing (the log was truncated)" % rid)
        elif got != anchored_hash:
            problems.append("row %d: hash differs from the anchored one (rewritten)" % rid)
    problems = result.problems + problems
    return result.model_copy(update={"ok": not problems, "problems": problems,
                                     "anchor": str(anchor.path),
                                     "anchored_heads": len(anchored)})


def export_jsonl(session: Session) -> Iterator[str]:
    for row in iter_rows(session):
        yield json.dumps(row.model_dump(), separators=(",", ":")) + "\n"
