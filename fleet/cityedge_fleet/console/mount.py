"""``install``: mounts the console's pages, forms and refusal page on the fleet's app."""

from __future__ import annotations

from fastapi import FastAPI

from cityedge_fleet.console import actions, pages
from cityedge_fleet.console.web import ConsoleRefusal, handle_refusal


def install(app: FastAPI) -> None:
    app.include_router(pages.router)
    app.include_router(actions.router)
    app.add_exception_handler(ConsoleRefusal, handle_refusal)
