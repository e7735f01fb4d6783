"""What every console page and form shares: the signed-in visit, rendering, the response
headers, form bodies and the CSRF rule.

Rules (the first that fails refuses):

1. A page needs a live session (``session.resume``); without one a GET is sent to the
   sign-in page (303) and a POST is refused (403), nothing changed.
2. A page or form needs a role its API operation lets in (``access``); otherwise 403,
   audited as the API audits a wrong role.
3. A POST needs ``application/x-www-form-urlencoded`` (415), an ``Origin`` and
   ``Sec-Fetch-Site``, when the browser sends them, of this very site (403), and the
   session's CSRF token (403, audited); only then is the form read for what it asks.

Every answer carries a Content-Security-Policy that allows no script at all (the console
has none), no framing, and forms posting only to itself; and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import Session

from cityedge_fleet import audit
from cityedge_fleet.auth import Principal, client_address
from cityedge_fleet.console import access
from cityedge_fleet.console import session as sessions
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import utcnow

HERE = Path(__file__).parent
FORM_FIELDS_MAX = 16  # fields in one console form
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
           "X-Frame-Options": "DENY"}

templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True,
                        lstrip_blocks=True)


class ConsoleRefusal(Exception):
    """A console request refused: shown as a page (or a redirect to sign in)."""

    def __init__(self, status: int, message: str, *, sign_in: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.sign_in = sign_in


@dataclass
class Visit:
    """A signed-in request: who, their session, and the pages their role may open."""

    who: Principal
    row: sessions.ConsoleSession
    request: Request
    pages: list[access.Page] = field(default_factory=list)
    form: dict[str, str] = field(default_factory=dict)  # a POST's fields, CSRF checked

    def may(self, api: access.Api) -> bool:
        return api.allows(self.who)


def harden(response: Response) -> Response:
    for key, value in HEADERS.items():
        response.headers[key] = value
    return response


def render(template: str, status: int = 200, visit: Visit | None = None,
           **context: Any) -> HTMLResponse:
    html = templates.get_template(template).render(
        visit=visit, who=visit.who if visit else None,
        pages=visit.pages if visit else [], csrf=visit.row.csrf if visit else "",
        **{"now": utcnow(), **context})
    response = HTMLResponse(html, status_code=status)
    harden(response)
    return response


def redirect(url: str) -> Response:
    return harden(RedirectResponse(url, status_code=303))


def _resume(request: Request, session: Session) -> tuple[Principal, sessions.ConsoleSession]:
    got = sessions.resume(session, request.cookies.get(sessions.COOKIE),
                          request.app.state.settings.limits)
    if got is None:
        if request.method == "GET":
            raise ConsoleRefusal(303, "sign in first", sign_in=True)
        raise ConsoleRefusal(403, "sign in first: nothing was changed")
    return got


def _deny(request: Request, session: Session, who: Principal, why: str) -> ConsoleRefusal:
    audit.record(session, actor=who.name, action="auth.forbidden", outcome=audit.DENIED,
                 target="%s %s" % (request.method, request.url.path),
                 source=client_address(request), detail={"role": who.role, "why": why})
    return ConsoleRefusal(403, "your role (%s) may not %s" % (who.role.value, why))


def require(request: Request, session: Session, who: Principal, api: access.Api,
            what: str) -> None:
    """Rule 2 for one operation (``what``: how the refusal names it)."""
    if not api.allows(who):
        raise _deny(request, session, who, what)


def page_visit(key: str) -> Any:
    """A dependency: a signed-in visit to page ``key`` (rules 1 and 2)."""
    page = access.PAGE[key]

    def dependency(request: Request, session: SessionDep) -> Visit:
        who, row = _resume(request, session)
        if not page.allows(who):
            raise _deny(request, session, who, "open %s" % page.title)
        return Visit(who, row, request, access.pages_for(who))

    return Depends(dependency)


async def read_form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise ConsoleRefusal(415, "a console form is sent as application/x-www-form-urlencoded")
    body = await request.body()  # at most the route's body limit (``body_limits``)
    try:
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True,
                                       strict_parsing=False, max_num_fields=FORM_FIELDS_MAX)
    except (UnicodeDecodeError, ValueError) as e:
        raise ConsoleRefusal(400, "the form could not be read") from e
    return dict(pairs)


def same_origin(request: Request) -> bool:
    """The browser says the form came from this site: ``Sec-Fetch-Site`` (when sent) is
    ``same-origin`` and ``Origin`` (when sent) is this site; ``null`` is refused. (The
    ``same-origin`` referrer policy is what lets a browser send the real Origin.)"""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site != "same-origin":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # no Origin (an older browser): the CSRF token decides alone
    return origin == "%s://%s" % (request.url.scheme, request.headers.get("host", ""))


async def _post_visit(request: Request, session: SessionDep) -> Visit:
    who, row = _resume(request, session)  # rule 1
    form = await read_form(request)  # rule 3
    if not same_origin(request) or not sessions.check_csrf(row.csrf, form.get("csrf")):
        audit.record(session, actor=who.name, action="console.csrf", outcome=audit.DENIED,
                     target="%s %s" % (request.method, request.url.path),
                     source=client_address(request), detail={})
        raise ConsoleRefusal(403, "this form is out of date or was not sent by this console "
                             "(CSRF check failed): nothing was changed; reload the page")
    return Visit(who, row, request, access.pages_for(who), form)


PostVisit = Annotated[Visit, Depends(_post_visit)]


async def handle_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleRefusal)
    if exc.sign_in:
        nxt = urllib.parse.quote(request.url.path)
        return redirect("/console/login?next=%s" % nxt)
    visit = None
    with Session(request.app.state.engine) as session:  # the menu, for one signed in
        got = sessions.resume(session, request.cookies.get(sessions.COOKIE),
                              request.app.state.settings.limits)
        if got is not None:
            visit = Visit(got[0], got[1], request, access.pages_for(got[0]))
        return render("error.html", status=exc.status, visit=visit, message=exc.message)
