"""The audit log's head, anchored outside the database, so deleting the newest rows shows.

A hash chain alone cannot tell a log whose last rows were deleted from a shorter log. So
after every commit that appended audit rows, the newest ``(id, hash)`` is appended as a
line ``<id> <hash>`` to an anchor file named by ``CITYEDGE_AUDIT_ANCHOR_FILE`` — outside
the database, ideally on another volume and append-only for the service (``chattr +a``).
``audit.verify`` then checks that every anchored row is still in the database with the
anchored hash: a truncated tail (or a chain rewritten from an anchored row on) is reported.
A configured anchor that is missing or holds no head while the log has rows is reported
too (deleting or emptying the file must not turn the check off).

The line is written after the commit (a rolled-back append anchors nothing). A crash
between the commit and the write leaves the anchor one commit behind: that row is not
protected until the next append, but nothing is falsely reported. Each engine gets its
anchor from ``db.make_engine``; several processes may append to the same file (``O_APPEND``
writes of one short line do not interleave).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import Session

from cityedge_core.errors import LocalError

_PENDING = "cityedge.audit_anchor.pending"
_LISTENING = "cityedge.audit_anchor.listening"
_anchors: weakref.WeakKeyDictionary[Engine, AuditAnchor] = weakref.WeakKeyDictionary()


class AnchorError(LocalError):
    """The anchor file cannot be written or read (a local fault, not tampering)."""


class AuditAnchor:
    """The append-only file of anchored ``(id, hash)`` heads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row_id: int, row_hash: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, b"%d %s\n" % (row_id, row_hash.encode()))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise AnchorError("cannot append to the audit anchor %s: %s" % (self.path, e)) from e

    def read(self) -> tuple[dict[int, str], list[str]]:
        """Anchored ``{id: hash}`` and the problems found in the file itself."""
        anchored: dict[int, str] = {}
        problems: list[str] = []
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return anchored, problems
        except OSError as e:
            raise AnchorError("cannot read the audit anchor %s: %s" % (self.path, e)) from e
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != 64:
                problems.append("anchor %s line %d is not '<id> <hash>'" % (self.path, n))
                continue
            anchored[int(parts[0])] = parts[1]
        return anchored, problems


def attach(engine: Engine, path: Path | None) -> None:
    """Anchor the audit rows appended through ``engine`` in ``path`` (None: no anchor)."""
    if path is None:
        _anchors.pop(engine, None)
    else:
        _anchors[engine] = AuditAnchor(path)


def engine_of(session: Session) -> Engine | None:
    """The engine a session is bound to (its anchor and audit key hang on it)."""
    bind: Any = session.get_bind()
    engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
    return engine if isinstance(engine, Engine) else None


def for_session(session: Session) -> AuditAnchor | None:
    engine = engine_of(session)
    return _anchors.get(engine) if engine is not None else None


def remember(session: Session, row_id: int, row_hash: str) -> None:
    """Anchor ``(row_id, row_hash)`` when ``session`` commits (forget it on rollback)."""
    if for_session(session) is None:
        return
    session.info[_PENDING] = (row_id, row_hash)
    if not session.info.get(_LISTENING):
        session.info[_LISTENING] = True
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_rollback", _after_rollback)


def _after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    anchor = for_session(session)
    if pending is not None and anchor is not None:
        anchor.append(*pending)


def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
