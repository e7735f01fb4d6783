"""The web console: server-rendered pages over the fleet's own API, in the same process.

Sign in with an API token (``session``), then pages and forms by role (``access``: the
roles of the API operation behind each), rendered on the server from Jinja2 templates with
no script at all (``web``: the CSP, the CSRF rule). ``install`` mounts it on the app.
"""

from __future__ import annotations

from fastapi import FastAPI

from cityedge_fleet.console import actions, pages
from cityedge_fleet.console.web import ConsoleRefusal, handle_refusal


def install(app: FastAPI) -> None:
    app.include_router(pages.router)
    app.include_router(actions.router)
    app.add_exception_handler(ConsoleRefusal, handle_refusal)
