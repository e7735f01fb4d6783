"""API tokens and roles: who is calling, and may they call this endpoint.

A token is 32 random bytes (URL-safe base64), shown once when created; the database keeps
only its SHA-256, compared in constant time. A request authenticates with
``Authorization: Bearer <token>``. Endpoints declare their roles with
``Depends(require_role(Role.technician, ...))``; ``admin`` may call everything; a wrong
role is 403.

Failed authentications, not successful ones, are rate-limited per client address and
audited: a valid token is always accepted, even from an address that failed many times
(behind a reverse proxy every client may share one address), while that address's failures
stay limited. Guessing a token is not what the limit prevents (256 random bits); it keeps
the audit log and the database from being flooded. The client address is the TCP peer,
or, when that peer is one of ``CITYEDGE_TRUSTED_PROXIES``, the address those proxies
forwarded (``forwarded_client``).

A technician token may be scoped to sites (``ApiToken.sites``; empty = unscoped):
``Principal.may_act_at`` is the whole rule, ``require_sites`` applies it for a route.
A vendor token names its vendor (``ApiToken.vendor``): ``hw_access`` decides what it sees.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.routing import APIRoute
from sqlmodel import Session, select

from cityedge_fleet import audit
from cityedge_fleet.config import IpNetwork
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import ApiToken, Role

TOKEN_BYTES = 32  # bytes of randomness in an API or enrollment token
ADDRESS_MAX_CHARS = 64  # characters of a client address kept (the audit row's source)


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
    sites: frozenset[str] = field(default_factory=frozenset)  # empty: not scoped
    vendor: str | None = None  # a vendor token's vendor (``hw_access``)

    def may_act_at(self, site: str | None) -> bool:
        """The scope rule: an unscoped token acts wherever its role allows; a scoped one
        only at its sites (``None``: no site is known, e.g. an unregistered serial)."""
        if not self.sites:
            return True
        return site is not None and site in self.sites

    def scope_detail(self) -> dict[str, Any]:
        """What an audit row's detail says of the caller's scope (nothing when unscoped)."""
        return {"scope": sorted(self.sites)} if self.sites else {}


def _in_networks(host: str, networks: Sequence[IpNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # not an address (a name, garbage): never a trusted proxy
    return any(address in net for net in networks)


def forwarded_client(peer: str, forwarded_for: Sequence[str],
                     trusted: Sequence[IpNetwork]) -> str:
    """The client's address: ``peer`` unless it is a trusted proxy; then, walking the
    ``X-Forwarded-For`` hops from the right (each proxy appends the address it saw), the
    first that is not a trusted proxy. Whatever a client writes itself stays left of that
    hop, so it cannot choose the answer. The same rule as uvicorn's proxy headers."""
    if not trusted or not _in_networks(peer, trusted):
        return peer[:ADDRESS_MAX_CHARS]
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not _in_networks(hop, trusted):
            return hop[:ADDRESS_MAX_CHARS]
    return (hops[0] if hops else peer)[:ADDRESS_MAX_CHARS]  # a chain of our own proxies


def client_address(request: Request) -> str:
    """The address audit rows and rate limits use (see ``forwarded_client``)."""
    peer = request.client.host if request.client else "unknown"
    trusted: list[IpNetwork] = request.app.state.settings.trusted_proxies
    return forwarded_client(peer, request.headers.getlist("x-forwarded-for"), trusted)


def create_api_token(session: Session, *, name: str, role: Role, created_by: str,
                     sites: Iterable[str] = (), vendor: str | None = None
                     ) -> tuple[ApiToken, str]:
    """Store a new token's hash; returns the row and the token (to show once)."""
    token = new_token()
    row = ApiToken(name=name, role=role, token_hash=hash_token(token), created_by=created_by,
                   sites=sorted(set(sites)), vendor=vendor)
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
    """A failed authentication: takes one from the address's bucket (429 once empty, not
    audited again: the audit log is what a flood would fill), audited, 401."""
    source = client_address(request)
    limiter = request.app.state.auth_limiter
    if not limiter.take(source):
        return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many failed logins")
    audit.record(session, actor="anonymous", action="auth.login", outcome=audit.DENIED,
                 target=request.url.path, source=source, detail={"why": why})
    return HTTPException(status.HTTP_401_UNAUTHORIZED, why,
                         headers={"WWW-Authenticate": "Bearer"})


def principal_of(row: ApiToken) -> Principal:
    """The caller a stored, unrevoked token stands for."""
    assert row.id is not None  # a stored row
    return Principal(name=row.name, role=Role(row.role), token_id=row.id,
                     sites=frozenset(row.sites), vendor=row.vendor)


def authenticate(request: Request, session: Session, token: str) -> Principal:
    """The caller ``token`` names; a failure is refused as every failed login is (rate
    limited per address, audited, 401). The API's bearer header and the console's sign-in
    form both come here."""
    row = _lookup(session, token.strip()) if token.strip() else None
    if row is None or row.id is None:
        raise _refuse(request, session, "invalid or revoked token")
    return principal_of(row)


def current_principal(request: Request, session: SessionDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _refuse(request, session, "missing bearer token")
    return authenticate(request, session, token)


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


def roles_of_route(route: APIRoute) -> frozenset[Role] | None:
    """The roles a route's own role check lets in (searched through its dependencies), or
    None for a route without one (the console and the role tests read the API this way)."""
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        roles = allowed_roles_of(dep.call)
        if roles is not None:
            return roles
        stack.extend(dep.dependencies)
    return None


def require_sites(request: Request, session: Session, who: Principal,
                  sites: Iterable[str | None], *, action: str, target: str,
                  refusal: str) -> None:
    """Refuse (403, audited with the caller's scope) unless ``who`` may act at every one of
    ``sites``. Call it before changing anything: the audit row is committed at once."""
    outside = [site for site in sites if not who.may_act_at(site)]
    if not outside:
        return
    audit.record(session, actor=who.name, action=action, outcome=audit.DENIED, target=target,
                 source=client_address(request),
                 detail={**who.scope_detail(), "sites": list(dict.fromkeys(outside))})
    raise HTTPException(status.HTTP_403_FORBIDDEN, "%s (this token is scoped to sites: %s)"
                        % (refusal, ", ".join(sorted(who.sites))))
