"""Roles and tokens: every endpoint refuses a wrong role with 403; tokens are stored hashed;
failed authentication is rate-limited and audited."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlmodel import Session, select

from cityedge_fleet.app import ROUTERS
from cityedge_fleet.auth import hash_token, roles_of_route
from cityedge_fleet.models import ApiToken, AuditRecord, Role
from cityedge_fleet.ratelimit import TokenBucketLimiter

from support.fleet import Api

PUBLIC = {  # endpoints anyone may call, and why
    ("GET", "/health"),
    ("GET", "/ready"),  # readiness: ok flags and the CRL's age, no paths, URLs or errors
    ("POST", "/enroll"),  # gated by an enrollment token or allow-list, rate-limited
    ("POST", "/enroll/ticket"),  # a device redeeming its offline ticket: token, rate-limited
    ("GET", "/ca/crl"),  # the CRL is public by design
    ("GET", "/ca/bundle"),  # so are the CA certificates
    ("GET", "/ca/fleet-keys"),  # and the public halves of the fleet's command keys
    # a device's OTA download: the capability its signed update command names (128 random
    # bits, ``ota_store.delivery``), the release's signed files only
    ("GET", "/ota/d/{token}/manifest"),
    ("GET", "/ota/d/{token}/keys"),
    ("GET", "/ota/d/{token}/artifact"),
}


def _protected_routes(api: Api) -> list[tuple[str, str, frozenset[Role]]]:
    """Every operation of the OpenAPI schema with the roles its route lets in."""
    declared: dict[tuple[str, str], frozenset[Role] | None] = {}
    for router in ROUTERS:
        for route in router.routes:
            assert isinstance(route, APIRoute)
            for method in route.methods:
                declared[(method, route.path)] = roles_of_route(route)
    schema = api.client.get("/openapi.json").json()
    out = []
    for path, ops in schema["paths"].items():
        for method in ops:
            key = (method.upper(), path)
            assert key in declared, "%s %s is served but not in ROUTERS" % key
            roles = declared[key]
            if roles is None:
                assert key in PUBLIC, "%s %s has no role check" % key
                continue
            out.append((key[0], path, roles))
    assert len(out) + len(PUBLIC) == len(declared)
    return out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_endpoint_refuses_every_wrong_role(api: Api) -> None:
    routes = _protected_routes(api)
    assert len(routes) >= 14
    checked = 0
    for method, path, roles in routes:
        url = re.sub(r"\{[^}]+\}", "x", path)
        for role in Role:
            if role in roles:
                continue
            r = api.client.request(method, url, headers=api.headers(role))
            assert r.status_code == 403, (method, path, role, r.status_code, r.text)
            checked += 1
        assert Role.admin in roles
    assert checked > len(routes)  # at least one wrong role per route
    with Session(api.engine) as s:
        denied = s.exec(select(AuditRecord).where(AuditRecord.action == "auth.forbidden")).all()
    assert len(denied) == checked


def test_no_or_bad_token_is_401_and_audited(api: Api) -> None:
    assert api.client.get("/devices").status_code == 401
    r = api.client.get("/devices", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "auth.login")).all()
    assert [r.outcome for r in rows] == ["denied", "denied"]


def test_tokens_are_stored_hashed_and_shown_once(api: Api) -> None:
    r = api.client.post("/tokens", json={"name": "alice", "role": "security"},
                        headers=api.headers(Role.admin))
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    assert len(token) >= 43  # 32 random bytes
    listed = api.client.get("/tokens", headers=api.headers(Role.admin)).json()
    assert all("token" not in t and "token_hash" not in t for t in listed)
    with Session(api.engine) as s:
        row = s.exec(select(ApiToken).where(ApiToken.name == "alice")).one()
        assert row.token_hash == hash_token(token) and token not in row.token_hash
    alice = {"Authorization": "Bearer " + token}
    assert api.client.get("/audit/verify", headers=alice).status_code == 200
    rid = r.json()["id"]
    assert api.client.post("/tokens/%d/revoke" % rid,
                           headers=api.headers(Role.admin)).status_code == 200
    assert api.client.get("/audit/verify", headers=alice).status_code == 401


def test_failures_are_limited_but_a_valid_token_is_always_accepted(api: Api) -> None:
    """An attacker at the admin's address (behind a reverse proxy: everyone) sends 50 bad
    tokens: the failures beyond the burst get 429 and stop being audited, and the admin's
    valid token still works from that address, every time, while bad ones stay limited."""
    admin = api.headers(Role.admin)
    burst = api.settings.limits.auth_fail_burst
    assert burst < 50
    # the bucket's clock stands still: a busy machine's slow requests refill nothing, so
    # the counts below are the limiter's rule, not what a timer allowed
    app: Any = api.client.app
    limiter = app.state.auth_limiter
    app.state.auth_limiter = TokenBucketLimiter(limiter.burst, limiter.per_s,
                                                limiter.max_clients, clock=lambda: 1000.0)
    codes = [api.client.get("/devices", headers={"Authorization": "Bearer bad"}).status_code
             for _ in range(50)]
    assert codes == [401] * burst + [429] * (50 - burst)
    for _ in range(3):
        assert api.client.get("/tokens", headers=admin).status_code == 200
        r = api.client.get("/devices", headers={"Authorization": "Bearer bad"})
        assert r.status_code == 429
    assert api.client.get("/devices").status_code == 429  # no token is a failure too
    with Session(api.engine) as s:
        denied = s.exec(select(AuditRecord).where(AuditRecord.action == "auth.login")).all()
    assert len(denied) == burst  # refusals past the burst do not fill the audit log
