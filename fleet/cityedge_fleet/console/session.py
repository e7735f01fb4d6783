"""Console sign-in sessions, kept in the database, and their CSRF tokens.

Signing in with an API token (``auth.authenticate``: the same rate limit and audit as the
API's bearer header) creates a ``console_session`` row. The browser gets 32 random bytes in
a ``__Host-`` cookie (HttpOnly, Secure, SameSite=Strict, Path=/); the row keeps only their
SHA-256, so a copy of the database signs nobody in. Why a stored session rather than a
signed cookie: signing out, revoking the API token and the idle limit end it at once on
every process sharing the database, and there is no cookie key to keep.

A session ends at the first of: sign-out, ``FleetLimits.console_session_s`` after sign-in,
``console_idle_s`` without a page view, or the revocation of its token (checked on every
request). Its CSRF token (32 random bytes, per session) goes into every form; a POST
without it, or with another, changes nothing (``check_csrf``, constant-time).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from sqlmodel import Field, Session, SQLModel, col, delete, select

from cityedge_fleet.auth import Principal, principal_of
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import ApiToken, UTCDateTime, utcnow

COOKIE = "__Host-cityedge-console"  # the session (``__Host-``: Secure, Path=/, no Domain)
LOGIN_COOKIE = "__Host-cityedge-login"  # the sign-in form's CSRF pair, before a session
SECRET_BYTES = 32  # random bytes of a session id, a CSRF token, the login form's token
TOUCH_S = 60  # seconds between two writes of a session's last use (not every request)


class ConsoleSession(SQLModel, table=True):
    __tablename__ = "console_session"
    id_hash: str = Field(primary_key=True, max_length=64)  # SHA-256 hex of the cookie
    token_id: int = Field(foreign_key="api_token.id", index=True)
    csrf: str = Field(max_length=64)  # the forms' token (useless without the cookie)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_used: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime, index=True)


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def start(session: Session, who: Principal, lim: FleetLimits) -> tuple[str, ConsoleSession]:
    """A new session for ``who``; returns the cookie value (never stored) and the row.
    Sessions that have expired are swept on the way (the table stays small)."""
    now = utcnow()
    session.exec(delete(ConsoleSession).where(
        col(ConsoleSession.expires_at) < now))
    cookie = new_secret()
    row = ConsoleSession(id_hash=_digest(cookie), token_id=who.token_id, csrf=new_secret(),
                         created_at=now, last_used=now,
                         expires_at=now + dt.timedelta(seconds=lim.console_session_s))
    session.add(row)
    session.commit()
    return cookie, row


def resume(session: Session, cookie: str | None, lim: FleetLimits
           ) -> tuple[Principal, ConsoleSession] | None:
    """The caller and session a cookie stands for, or None (no cookie, unknown, expired,
    idle too long, or its token revoked: an ended session's row is deleted)."""
    if not cookie or len(cookie) > 2 * SECRET_BYTES:
        return None
    digest = _digest(cookie)
    row = session.get(ConsoleSession, digest)
    if row is None or not hmac.compare_digest(row.id_hash, digest):
        return None
    now = utcnow()
    token = session.get(ApiToken, row.token_id)
    if (now >= row.expires_at or now - row.last_used > dt.timedelta(seconds=lim.console_idle_s)
            or token is None or token.revoked):
        session.delete(row)
        session.commit()
        return None
    if now - row.last_used > dt.timedelta(seconds=TOUCH_S):
        row.last_used = now
        session.add(row)
        session.commit()
    return principal_of(token), row


def end(session: Session, row: ConsoleSession) -> None:
    session.exec(delete(ConsoleSession).where(
        col(ConsoleSession.id_hash) == row.id_hash))
    session.commit()


def check_csrf(expected: str, given: str | None) -> bool:
    """The form's token equals the session's (constant-time)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def sessions_of(session: Session, token_id: int) -> list[ConsoleSession]:
    return list(session.exec(select(ConsoleSession).where(
        ConsoleSession.token_id == token_id)))
