"""API tokens and roles: who is calling, and may they call this endpoint.

A token is 32 random bytes (URL-safe base64), shown once when created; the database keeps
only its SHA-256, compared in constant time. A request authenticates with
``Authorization: Bearer <token>``. Endpoints declare their roles with
``Depends(require_role(Role.technician, ...))``; ``admin`` may call everything. Failed
authentications are rate-limited per client address and audited; a wrong role is 403.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from sqlmodel import Session, select

from cityedge_fleet import audit
from cityedge_fleet.db import SessionDep
from cityedge_fleet.models import ApiToken, Role

TOKEN_BYTES = 32  # bytes of randomness in an API or enrollment token


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    name: str
    role: Role
    token_id: int


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def create_api_token(session: Session, *, name: str, role: Role, created_by: str) -> tuple[
        ApiToken, str]:
    """Store a new token's hash; returns the row and the token (to show once)."""
    token = new_token()
    row = ApiToken(name=name, role=role, token_hash=hash_token(token), created_by=created_by)
    session.add(row)
    session.flush()
    return row, token


def _lookup(session: Session, token: str) -> ApiToken | None:
    digest = hash_token(token)
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked:
        return None
    return row


def _refuse(request: Request, session: Session, why: str) -> HTTPException:
    source = client_address(request)
    limiter = request.app.state.auth_limiter
    if not limiter.take(source):
        return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many failed logins")
    audit.record(session, actor="anonymous", action="auth.login", outcome=audit.DENIED,
                 target=request.url.path, source=source, detail={"why": why})
    return HTTPException(status.HTTP_401_UNAUTHORIZED, why,
                         headers={"WWW-Authenticate": "Bearer"})


def current_principal(request: Request, session: SessionDep) -> Principal:
    source = client_address(request)
    if not request.app.state.auth_limiter.allowed(source):
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many failed logins")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _refuse(request, session, "missing bearer token")
    row = _lookup(session, token.strip())
    if row is None or row.id is None:
        raise _refuse(request, session, "invalid or revoked token")
    return Principal(name=row.name, role=Role(row.role), token_id=row.id)


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require_role(*roles: Role) -> Callable[..., Principal]:
    """A dependency that lets through ``roles`` (and admin), 403 for everybody else."""
    allowed = frozenset(roles) | {Role.admin}

    def dependency(request: Request, session: SessionDep, principal: PrincipalDep) -> Principal:
        if principal.role not in allowed:
            audit.record(session, actor=principal.name, action="auth.forbidden",
                         outcome=audit.DENIED, target="%s %s" % (request.method,
                                                                  request.url.path),
                         source=client_address(request), detail={"role": principal.role})
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "role %s may not do this" % principal.role.value)
        return principal

    dependency.allowed_roles = allowed  # type: ignore[attr-defined]  # read by the tests
    return dependency


def allowed_roles_of(dependency: Any) -> frozenset[Role] | None:
    roles = getattr(dependency, "allowed_roles", None)
    return roles if isinstance(roles, frozenset) else None
