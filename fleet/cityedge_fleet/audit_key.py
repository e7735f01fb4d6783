"""The audit log's MAC key: 32 random bytes in a file outside the database.

A hash chain alone is rewritable by anyone who can write the table: recompute SHA-256 from
the first changed row on and the chain verifies again. So every row's ``hash`` is an
HMAC-SHA256 under this key (``audit``), and a database editor who lacks the key cannot
produce a row that verifies. The key lives in a file named by ``CITYEDGE_AUDIT_KEY_FILE``
(mode 0600, exactly ``KEY_BYTES`` bytes), never in the database, never logged; only its
``key_id`` (a hash of it, not a secret) is stored with each row and printed.

``cityedge audit init-key`` creates it once. In development mode a missing key is created
at first start; in production a missing, short or group/world-readable key file stops the
service at start. Each engine gets its key from ``db.make_engine`` (``attach``), the way it
gets its anchor (``audit_anchor``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import weakref
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_core.errors import LocalError
from cityedge_fleet.audit_anchor import engine_of
from cityedge_fleet.config import Settings

KEY_BYTES = 32  # bytes of the HMAC-SHA256 key
ALG_PREFIX = "hmac-sha256:"  # a keyed row's ``alg``: this prefix and the key id
_ID_DOMAIN = b"cityedge audit key id\x00"  # a key id is never a MAC of row data

_keys: weakref.WeakKeyDictionary[Engine, AuditKey] = weakref.WeakKeyDictionary()


class AuditKeyError(LocalError):
    """The key file is missing, unreadable, of the wrong size or readable by others."""


class AuditKey:
    """The MAC key and where it came from (``created`` when this process made it)."""

    def __init__(self, key: bytes, path: Path, created: bool = False) -> None:
        if len(key) != KEY_BYTES:
            raise AuditKeyError("the audit key %s has %d bytes, not %d"
                                % (path, len(key), KEY_BYTES))
        self.secret = key
        self.path = path
        self.created = created
        self.key_id = hashlib.sha256(_ID_DOMAIN + key).hexdigest()[:16]

    @property
    def alg(self) -> str:
        return ALG_PREFIX + self.key_id

    def __repr__(self) -> str:  # never the secret
        return "AuditKey(%s, id %s)" % (self.path, self.key_id)


def create(path: Path) -> bool:
    """Write a new random key to ``path`` (0600) unless a key is there; True if written.

    The file appears whole or not at all (written beside it, then hard-linked into place:
    ``link`` fails if another process got there first), so two services starting at once
    in development end up with the same key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(".%s.%s.tmp" % (path.name, secrets.token_hex(4)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    except OSError as e:
        raise AuditKeyError("cannot create the audit key %s: %s" % (path, e)) from e
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, *, create_missing: bool = False) -> AuditKey:
    """The key in ``path``; created first when missing and ``create_missing``."""
    created = False
    if create_missing and not path.exists():
        created = create(path)
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuditKeyError("the audit key %s is open to other users (mode %o): "
                                "chmod 600 it" % (path, stat.S_IMODE(st.st_mode)))
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise AuditKeyError(
            "the audit key %s does not exist: create it once with `cityedge audit "
            "init-key` (CITYEDGE_AUDIT_KEY_FILE names it)" % path) from e
    except OSError as e:
        raise AuditKeyError("cannot read the audit key %s: %s" % (path, e)) from e
    return AuditKey(data, path, created)


def from_settings(settings: Settings) -> AuditKey:
    """The configured key; a development fleet makes its own at first start."""
    return load(settings.audit_key_file, create_missing=settings.mode == "development")


def attach(engine: Engine, key: AuditKey | None) -> None:
    """Key the audit rows appended through ``engine`` (None: plain SHA-256, tests only)."""
    if key is None:
        _keys.pop(engine, None)
    else:
        _keys[engine] = key


def for_session(session: Session) -> AuditKey | None:
    engine = engine_of(session)
    return _keys.get(engine) if engine is not None else None
