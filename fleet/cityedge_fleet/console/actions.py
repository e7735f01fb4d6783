"""The console's forms (POST) and its sign-in: each form runs the API operation's own
route function, so the same checks, audit rows and wake-ups happen as over the API; the
console adds only the session, the CSRF check and the role check read from that
operation (``web``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from cityedge_fleet import audit
from cityedge_fleet.api import campaigns as rotation_routes
from cityedge_fleet.api import enroll_routes, ota_routes
from cityedge_fleet.auth import authenticate, client_address
from cityedge_fleet.console import access
from cityedge_fleet.console import session as sessions
from cityedge_fleet.console.pages import campaign_status, waves_of
from cityedge_fleet.console.web import (
    HERE,
    ConsoleRefusal,
    PostVisit,
    harden,
    read_form,
    redirect,
    render,
    require,
    same_origin,
)
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import ID_MAX, EnrollmentTokenCreate

router = APIRouter(prefix="/console", include_in_schema=False)
TOKEN_FIELD_MAX = 256  # characters of a pasted API token

ACTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("rotation", "pause"): rotation_routes.pause_campaign,
    ("rotation", "resume"): rotation_routes.resume_campaign,
    ("rotation", "abort"): rotation_routes.abort_campaign,
    ("ota", "pause"): ota_routes.pause_campaign,
    ("ota", "resume"): ota_routes.resume_campaign,
    ("ota", "abort"): ota_routes.abort_campaign,
}


def _next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if target and target.startswith("/console/") and "//" not in target \
            and "\\" not in target:
        return target
    return "/console/"


def _login_page(request: Request, status: int = 200, error: str | None = None,
                target: str | None = None) -> Response:
    pair = sessions.new_secret()
    response = render("login.html", status=status, error=error, login_csrf=pair,
                      next=_next(target or request.query_params.get("next")))
    response.set_cookie(sessions.LOGIN_COOKIE, pair, max_age=900, httponly=True, secure=True,
                        samesite="strict", path="/")
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return _login_page(request)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, session: SessionDep) -> Response:
    """Sign in with an API token: the API's own check (``auth.authenticate``: rate limit,
    audit), a role that has console pages, then a new session (never one the browser
    brings: a fresh cookie each time)."""
    form = await read_form(request)
    target = form.get("next")
    pair = request.cookies.get(sessions.LOGIN_COOKIE)
    if not same_origin(request) or pair is None or not sessions.check_csrf(
            pair, form.get("csrf")):
        return _login_page(request, 403, "The sign-in form was out of date: try again.",
                           target)
    token = form.get("token", "")[:TOKEN_FIELD_MAX]
    try:
        who = authenticate(request, session, token)
    except HTTPException as e:
        why = ("Too many failed sign-ins from this address: wait a minute."
               if e.status_code == 429 else "That token is not valid (or was revoked).")
        return _login_page(request, e.status_code, why, target)
    if not access.pages_for(who):
        audit.record(session, actor=who.name, action="console.login", outcome=audit.DENIED,
                     source=client_address(request), detail={"role": who.role})
        return _login_page(request, 403, "The %s role has no console pages." % who.role.value,
                           target)
    cookie, _row = sessions.start(session, who, request.app.state.settings.limits)
    audit.record(session, actor=who.name, action="console.login", outcome=audit.OK,
                 source=client_address(request), detail={"role": who.role})
    first = access.pages_for(who)[0].href
    response = redirect(_next(target) if target and target != "/console/" else first)
    response.set_cookie(sessions.COOKIE, cookie,
                        max_age=request.app.state.settings.limits.console_session_s,
                        httponly=True, secure=True, samesite="strict", path="/")
    response.delete_cookie(sessions.LOGIN_COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    return response


@router.post("/logout")
def logout(visit: PostVisit, session: SessionDep) -> Response:
    sessions.end(session, visit.row)
    response = redirect("/console/login")
    response.delete_cookie(sessions.COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    return response


@router.post("/campaigns/{kind}/{campaign_id}/{action}")
def campaign_action(visit: PostVisit, session: SessionDep,
                    kind: Annotated[str, Path(pattern="^(rotation|ota)$")],
                    campaign_id: Annotated[int, Path(ge=1, le=ID_MAX)],
                    action: Annotated[str, Path(pattern="^(pause|resume|abort)$")]
                    ) -> Response:
    """Pause, resume or abort: the API route itself (``POST /campaigns/{id}/pause`` ...)."""
    require(visit.request, session, visit.who, access.campaign_action(kind, action),
            "%s %s campaigns" % (action, kind))
    try:
        ACTIONS[(kind, action)](campaign_id=campaign_id, request=visit.request,
                                session=session, who=visit.who)
    except HTTPException as e:
        got = campaign_status(session, kind, campaign_id)
        api = access.ROTATION_CAMPAIGN if kind == "rotation" else access.OTA_CAMPAIGN
        return render("campaign.html", status=e.status_code, visit=visit, kind=kind, c=got,
                      waves=waves_of(got.get("devices") or []), api=api,
                      actions=[(a, x) for a, x in (
                          (a, access.campaign_action(kind, a))
                          for a in access.CAMPAIGN_ACTIONS) if visit.may(x)],
                      done=None, error=str(e.detail))
    return redirect("/console/campaigns/%s/%d?done=%s" % (kind, campaign_id, action))


@router.post("/enrollment", response_class=HTMLResponse)
def issue_enrollment_token(visit: PostVisit, session: SessionDep) -> Response:
    """A one-time enrollment token (``POST /enrollment/tokens``), shown on this answer
    only: the page is not cached and the fleet keeps only the token's hash."""
    require(visit.request, session, visit.who, access.ENROLLMENT_TOKEN,
            "issue enrollment tokens")
    lim = visit.request.app.state.settings.limits
    context = {"api": access.ENROLLMENT_TOKEN, "ttl_default": lim.enroll_token_ttl_s // 60,
               "ttl_max": lim.enroll_token_max_ttl_s // 60, "issued": None, "error": None}
    try:
        minutes = int(visit.form.get("ttl_min") or lim.enroll_token_ttl_s // 60)
        body = EnrollmentTokenCreate(serial=visit.form.get("serial", ""), ttl_s=minutes * 60)
    except (ValueError, ValidationError):
        context["error"] = ("A serial of 1 to 128 characters and a lifetime in whole "
                            "minutes, please.")
        return render("enrollment.html", status=422, visit=visit, **context)
    try:
        context["issued"] = enroll_routes.create_enrollment_token(
            body=body, request=visit.request, session=session,
            settings=visit.request.app.state.settings, who=visit.who)
    except HTTPException as e:
        detail = e.detail if isinstance(e.detail, str) else "; ".join(
            str(d.get("msg", "")) for d in e.detail)
        context["error"] = detail
        return render("enrollment.html", status=e.status_code, visit=visit, **context)
    return render("enrollment.html", status=201, visit=visit, **context)


STATIC = {"console.css": "text/css", "favicon.svg": "image/svg+xml"}  # the only files


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name not in STATIC:
        raise ConsoleRefusal(404, "no such file")
    data = (HERE / "static" / name).read_bytes()
    response = harden(Response(data, media_type=STATIC[name]))
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
