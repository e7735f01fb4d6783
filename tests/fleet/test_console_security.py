"""The web console's security rules, attacked over HTTP against the real app: no page
without a session, CSRF on every state change, the cookie's flags, sessions that end, and
every form walked as every role (the console lets in exactly the roles of the API
operation behind it; a viewer triggers nothing)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import func, text
from sqlmodel import Session, col, select

from cityedge_fleet import campaign_store
from cityedge_fleet.app import create_app
from cityedge_fleet.config import Settings
from cityedge_fleet.console import access, actions, pages
from cityedge_fleet.console.session import COOKIE, LOGIN_COOKIE, ConsoleSession
from cityedge_fleet.models import (
    ApiToken,
    AuditRecord,
    EnrollmentToken,
    IngestEvent,
    Reading,
    Role,
)

from support.console import ConsoleClient, csrf_of, https_client, rotation_campaign, seed_fleet
from support.fleet import Api

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
SIGN_IN_ROLES = [r for r in Role if r != Role.monitor]  # monitor: no console pages


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    app = create_app(settings, init_db=True)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def api(app: FastAPI, settings: Settings) -> Iterator[Api]:
    with https_client(app) as client:
        yield Api(client, settings)


def console_routes(app: FastAPI) -> list[tuple[str, str]]:
    out = []
    for route in [*pages.router.routes, *actions.router.routes]:
        if isinstance(route, APIRoute) and route.path.startswith("/console"):
            out.extend((m, route.path) for m in sorted(route.methods or ()))
    return out


def concrete(path: str, device: str, campaign: int) -> str:
    return (path.replace("{device_id}", device).replace("{kind}", "rotation")
            .replace("{campaign_id}", str(campaign)).replace("{action}", "pause"))


OPEN = {("GET", "/console/login"), ("POST", "/console/login"),
        ("GET", "/console/static/{name}")}


def counts(api: Api) -> tuple[int, int, str]:
    with Session(api.engine) as s:
        tokens = s.exec(select(func.count()).select_from(EnrollmentToken)).one()
        sessions = s.exec(select(func.count()).select_from(ConsoleSession)).one()
        states = ",".join(str(c.state) for c in campaign_store.campaigns(s))
    return tokens, sessions, states


@SQLITE
def test_no_page_works_without_a_session(api: Api, app: FastAPI) -> None:
    ids = seed_fleet(api.engine, 6)
    cid = rotation_campaign(api.engine, api.settings)
    routes = console_routes(app)
    assert len(routes) >= 12
    before = counts(api)
    for cookie in (None, "x" * 43, "not-a-session"):
        api.client.cookies.clear()
        if cookie:
            api.client.cookies.set(COOKIE, cookie)
        for method, path in routes:
            if (method, path) in OPEN:
                continue
            url = concrete(path, ids[0], cid)
            r = api.client.request(method, url, data={"csrf": "x", "serial": "SN-1"},
                                   follow_redirects=False)
            if method == "GET":
                assert r.status_code == 303, (method, url, r.status_code)
                assert r.headers["location"].startswith("/console/login?next=")
            else:
                assert r.status_code == 403, (method, url, r.status_code)
            assert ids[0] not in r.text  # nothing of the fleet shown
    assert counts(api) == before


@SQLITE
def test_csrf_is_required_on_every_state_change(api: Api, app: FastAPI) -> None:
    ids = seed_fleet(api.engine, 6)
    cid = rotation_campaign(api.engine, api.settings)
    cc = ConsoleClient(api.client)
    good = cc.sign_in(api.token(Role.admin))
    posts = [p for m, p in console_routes(app) if m == "POST" and p != "/console/login"]
    assert set(posts) == {"/console/logout", "/console/enrollment",
                          "/console/campaigns/{kind}/{campaign_id}/{action}"}
    before = counts(api)
    for path in posts:
        url = concrete(path, ids[0], cid)
        for form, headers in (
                ({"serial": "SN-1"}, {}),  # no token
                ({"csrf": "", "serial": "SN-1"}, {}),
                ({"csrf": good[:-2] + "xx", "serial": "SN-1"}, {}),  # another token
                ({"csrf": good, "serial": "SN-1"}, {"Origin": "https://evil.example"}),
                ({"csrf": good, "serial": "SN-1"}, {"Origin": "null"})):
            r = api.client.post(url, data=form, headers=headers, follow_redirects=False)
            assert r.status_code == 403, (url, form, headers, r.status_code)
            assert "CSRF" in r.text
        # a JSON body (what a cross-site fetch could send without a preflight: no) is not
        # a form at all
        r = api.client.post(url, json={"csrf": good}, follow_redirects=False)
        assert r.status_code == 415
    assert counts(api) == before  # nothing changed, the session is still there
    with Session(api.engine) as s:
        denied = s.exec(select(func.count()).select_from(AuditRecord).where(
            AuditRecord.action == "console.csrf")).one()
    assert denied == 5 * len(posts)
    # and with the token, the same request works
    r = api.client.post(concrete(posts[0], ids[0], cid) if "campaign" in posts[0] else
                        "/console/campaigns/rotation/%d/pause" % cid, data={"csrf": good},
                        follow_redirects=False)
    assert r.status_code == 303


@SQLITE
def test_session_cookie_flags_and_what_the_database_keeps(api: Api) -> None:
    page = api.client.get("/console/login")
    login_cookie = page.headers["set-cookie"]
    assert login_cookie.startswith(LOGIN_COOKIE + "=")
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert flag.lower() in login_cookie.lower(), flag
    token = api.token(Role.security)
    r = api.client.post("/console/login", data={"csrf": csrf_of(page.text), "token": token},
                        follow_redirects=False)
    assert r.status_code == 303
    cookies = r.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookies if c.startswith(COOKIE + "="))
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/", "Max-Age=28800"):
        assert flag.lower() in session_cookie.lower(), flag
    assert "domain=" not in session_cookie.lower()  # __Host-: this host only
    value = api.client.cookies.get(COOKIE)
    assert value and token not in session_cookie
    with Session(api.engine) as s:
        row = s.exec(select(ConsoleSession)).one()
        dump = " ".join(str(v) for v in row.model_dump().values())
    assert value not in dump and token not in dump  # only the cookie's SHA-256
    # every console answer is hardened
    home = api.client.get("/console/")
    assert "script-src" not in home.headers["content-security-policy"]  # none at all
    assert "default-src 'none'" in home.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in home.headers["content-security-policy"]
    assert home.headers["cache-control"] == "no-store"
    assert "<script" not in home.text


@SQLITE
def test_sessions_end_on_sign_out_expiry_idleness_and_token_revocation(
        api: Api, settings: Settings) -> None:
    cc = ConsoleClient(api.client)

    def signed_in() -> bool:
        return api.client.get("/console/", follow_redirects=False).status_code == 200

    csrf = cc.sign_in(api.token(Role.viewer))
    assert signed_in()
    r = api.client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    stolen = cc.cookie() or "gone"
    api.client.cookies.set(COOKIE, stolen)
    assert not signed_in()
    for column, shift in (("expires_at", dt.timedelta(seconds=-1)),
                          ("last_used", dt.timedelta(
                              seconds=-settings.limits.console_idle_s - 5))):
        api.client.cookies.clear()
        cc.sign_in(api.token(Role.viewer))
        assert signed_in()
        with Session(api.engine) as s:
            row = s.exec(select(ConsoleSession)).one()
            setattr(row, column, dt.datetime.now(dt.UTC) + shift if column == "expires_at"
                    else row.last_used + shift)
            s.add(row)
            s.commit()
        assert not signed_in(), column
    api.client.cookies.clear()
    cc.sign_in(api.token(Role.viewer))
    with Session(api.engine) as s:
        tok = s.exec(select(ApiToken).where(ApiToken.role == Role.viewer)).one()
        tok.revoked = True
        s.add(tok)
        s.commit()
    assert not signed_in()
    with Session(api.engine) as s:  # ended sessions are deleted, not kept
        assert s.exec(select(func.count()).select_from(ConsoleSession)).one() == 0


@SQLITE
def test_sign_in_refusals(api: Api) -> None:
    page = api.client.get("/console/login")
    csrf = csrf_of(page.text)
    r = api.client.post("/console/login", data={"csrf": csrf, "token": "wrong"})
    assert r.status_code == 401 and "not valid" in r.text
    assert COOKIE not in api.client.cookies
    # without the login form's pair (a cross-site form): refused before the token is read
    api.client.cookies.clear()
    r = api.client.post("/console/login", data={"csrf": csrf,
                                                "token": api.token(Role.admin)})
    assert r.status_code == 403 and COOKIE not in api.client.cookies
    # a monitor token has no console pages
    page = api.client.get("/console/login")
    r = api.client.post("/console/login", data={"csrf": csrf_of(page.text),
                                                "token": api.token(Role.monitor)})
    assert r.status_code == 403 and COOKIE not in api.client.cookies
    # after sign-in, never to another site
    page = api.client.get("/console/login?next=//evil.example/x")
    r = api.client.post("/console/login", data={
        "csrf": csrf_of(page.text), "token": api.token(Role.admin),
        "next": "https://evil.example/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/"
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord.action, AuditRecord.outcome).where(
            col(AuditRecord.action).in_(("auth.login", "console.login")))
            .order_by(col(AuditRecord.id))).all()
    assert [tuple(r) for r in rows] == [("auth.login", "denied"), ("console.login", "denied"),
                                        ("console.login", "ok")]


FORM = re.compile(r'<form method="post" action="([^"]+)"')


@SQLITE
def test_every_form_as_every_role(api: Api) -> None:
    """Each role sees the forms its API operations allow, and nothing else; posting any
    form its role may not use is refused (403, audited) and changes nothing."""
    ids = seed_fleet(api.engine, 6)
    cid = rotation_campaign(api.engine, api.settings)
    forms = {"/console/enrollment": access.ENROLLMENT_TOKEN}
    for action in access.CAMPAIGN_ACTIONS:
        forms["/console/campaigns/rotation/%d/%s" % (cid, action)] = \
            access.campaign_action("rotation", action)
        forms["/console/campaigns/ota/1/%s" % action] = access.campaign_action("ota", action)
    pages = ["/console/", "/console/devices", "/console/devices/" + ids[0],
             "/console/campaigns", "/console/campaigns/rotation/%d" % cid,
             "/console/audit", "/console/enrollment", "/console/hardware"]
    walked = 0
    for role in SIGN_IN_ROLES:
        api.client.cookies.clear()
        csrf = ConsoleClient(api.client).sign_in(api.token(role))
        shown: set[str] = set()
        for page in pages:
            r = api.client.get(page)
            assert r.status_code in (200, 403), (role, page)
            shown |= set(FORM.findall(r.text))
        shown.discard("/console/logout")
        assert shown == {f for f, op in forms.items() if role in op.roles
                         and "/ota/" not in f}, role
        for form, op in forms.items():
            before = counts(api)
            r = api.client.post(form, data={"csrf": csrf, "serial": "SN-%d" % walked,
                                            "ttl_min": "10"}, follow_redirects=False)
            walked += 1
            if role in op.roles:
                assert r.status_code != 403, (role, form, r.text)
            else:
                assert r.status_code == 403, (role, form, r.status_code)
                assert counts(api) == before, (role, form)
    assert walked == len(SIGN_IN_ROLES) * len(forms)
    # the viewer, in particular, has no form but signing out
    assert {r for r in Role if r not in access.ENROLLMENT_TOKEN.roles} >= {Role.viewer}


@SQLITE
def test_enrollment_token_is_shown_once(api: Api) -> None:
    csrf = ConsoleClient(api.client).sign_in(api.token(Role.technician))
    r = api.client.post("/console/enrollment", data={"csrf": csrf, "serial": "SN-42",
                                                     "ttl_min": "30"})
    assert r.status_code == 201
    token = re.search(r'id="issued-token">([^<]+)<', r.text)
    assert token
    assert r.headers["cache-control"] == "no-store"
    with Session(api.engine) as s:
        row = s.exec(select(EnrollmentToken)).one()
        assert row.serial == "SN-42" and token.group(1) not in str(row.model_dump())
    assert token.group(1) not in api.client.get("/console/enrollment").text
    r = api.client.post("/console/enrollment", data={"csrf": csrf, "serial": "",
                                                     "ttl_min": "x"})
    assert r.status_code == 422


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_device_list_pages_filters_and_searches(api: Api) -> None:
    ids = seed_fleet(api.engine, 30)
    ConsoleClient(api.client).sign_in(api.token(Role.viewer))
    seen: list[str] = []
    url: str | None = "/console/devices?state=active"
    pages = 0
    while url:
        r = api.client.get(url)
        assert r.status_code == 200
        seen += re.findall(r'<td><a href="/console/devices/([^"]+)">', r.text)
        nxt = re.search(r'<a rel="next" href="([^"]+)"', r.text)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
        pages += 1
    with Session(api.engine) as s:
        active = [d for (d,) in s.execute(text(
            "SELECT id FROM device WHERE state = 'active' ORDER BY id"))]
    assert seen == active and len(active) == 18
    r = api.client.get("/console/devices?q=SN-00007")
    assert re.findall(r'<td><a href="/console/devices/([^"]+)">', r.text) == [ids[7]]
    r = api.client.get("/console/devices?q=urn:dev:mac:0024befffe00001")
    assert len(re.findall(r'<td><a href="/console/devices/', r.text)) == 14  # 0x10..0x1d
    r = api.client.get("/console/devices?site=park&model=ce-air-1")
    got = re.findall(r'<td><a href="/console/devices/([^"]+)">', r.text)
    assert got == [ids[i] for i in range(30) if i % 3 == 1 and i % 2 == 1]
    r = api.client.get("/console/devices?q=%25")  # a LIKE wildcard matches itself only
    assert "No device matches." in r.text


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_overview_shows_the_ingest_rate_and_the_alerts_of_the_last_hour(api: Api) -> None:
    """The rate counts readings by when the database stored them; alerts name what the
    ingest refused within the hour, and quarantines; older events raise nothing."""
    ids = seed_fleet(api.engine, 30)
    now = dt.datetime.now(dt.UTC)
    with Session(api.engine) as s:
        s.execute(text("UPDATE reading SET stored_at = :t"),
                  {"t": now - dt.timedelta(hours=2)})
        for n, ago in ((600, dt.timedelta(seconds=30)), (1800, dt.timedelta(minutes=30))):
            s.add_all(Reading(device_id=ids[1], t=1.0e9 + i, name="noise", unit="dB",
                              value=50.0, batch_seq=i, status="ok", stored_at=now - ago)
                      for i in range(n))
        s.add_all([IngestEvent(device_id=ids[2], status="bad_signature"),
                   IngestEvent(device_id=ids[3], status="bad_signature"),
                   IngestEvent(device_id=ids[4], status="malformed",
                               at=now - dt.timedelta(hours=2))])
        s.commit()
    ConsoleClient(api.client).sign_in(api.token(Role.viewer))
    html = api.client.get("/console/").text
    rates = re.search(r'id="h-rate".*?<tbody><tr>(.*?)</tr>', html, re.S)
    assert rates is not None
    # 600 in the last minute; the same 600 over 5 min; 2,400 over the hour
    assert re.findall(r'<td class="num">([\d.]+)</td>', rates.group(1)) == ["10.0", "2.0",
                                                                           "0.7"]
    alerts = re.search(r'<ul class="alerts" role="list">(.*?)</ul>', html, re.S)
    assert alerts is not None
    assert re.findall(r"<li>(.*?)</li>", alerts.group(1)) == [
        "2 bad signature in the last hour, from 2 device(s)",
        "1 replay in the last hour, from 1 device(s)",  # seeded: a gap, a replay, a "forgery"
        "3 device(s) quarantined"]
