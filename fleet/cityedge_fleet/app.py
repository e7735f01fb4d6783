"""The fleet service's FastAPI application: ``create_app(settings)``.

The factory opens the database (``db.open_database``: it creates one only with
``init_db``, else a missing or foreign database stops it), applies the migrations, loads
the command key (``command_key``), creates the rate limiters and mounts the routers. It
does not start the ingest worker, the CRL refresher or the command publisher: ``fleet
serve`` does (``cityedge_fleet.serve``), so tests can build an app without MQTT.

Every request passes the body limit of its route first (``body_limits``: 413 before a
body is parsed), then the URL text rule; validation errors never echo the input
(``api.errors``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cityedge_fleet import command_key, metrics, readiness
from cityedge_fleet.api import (
    audit_routes,
    campaigns,
    command_key_routes,
    commands,
    devices,
    docs,
    enroll_routes,
    enroll_ticket,
    errors,
    hw_reports,
    metrics_routes,
    ota_routes,
    rotations,
    tokens,
)
from cityedge_fleet.body_limits import BodyLimits, route_limits
from cityedge_fleet.broker_sync import BrokerAccess
from cityedge_fleet.config import Settings
from cityedge_fleet.console.mount import install as install_console
from cityedge_fleet.db import open_database
from cityedge_fleet.models import CONTROL_CHARACTERS
from cityedge_fleet.opendata import routes as opendata_routes
from cityedge_fleet.opendata.catalogue import OpenData
from cityedge_fleet.ratelimit import DownloadBudget, TokenBucketLimiter

health_router = APIRouter(tags=["health"])


@health_router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process answers (its parts are judged by ``/ready``)."""
    return {"status": "ok"}


@health_router.get("/ready", responses={503: {"description": "a component is not ready"}})
def ready(request: Request) -> JSONResponse:
    """Readiness, each component on its own: the database, the CA, the CRL (age, time
    left) and this process's ingest worker (``readiness``). 200 ready, 503 not."""
    state = request.app.state
    ok, body = readiness.check(state.engine, state.settings,
                               getattr(state, "ingest_worker", None))
    return JSONResponse(body, status_code=200 if ok else 503)


ROUTERS = (health_router, tokens.router, devices.router, enroll_routes.router,
           enroll_ticket.router, audit_routes.router, commands.router, rotations.router,
           campaigns.router, command_key_routes.router, hw_reports.router,
           metrics_routes.router, ota_routes.router)


def create_app(settings: Settings, *, init_db: bool = False) -> FastAPI:
    engine = open_database(settings, "create" if init_db else "write")
    app = FastAPI(
        title="cityedge fleet",
        docs_url=None,  # ``api.docs``: the page and its assets served from here, no CDN
        redoc_url=None,
        summary="Device registry, CA, gated enrollment, audit log and verified readings.",
        version="0.1.0",
        exception_handlers={RequestValidationError: errors.validation_error,
                            StarletteHTTPException: errors.http_error},
    )
    lim = settings.limits
    app.state.settings = settings
    app.state.engine = engine
    # the command key signs commands and its public half goes to every enrolled device:
    # loaded now, so a missing or unsafe key stops the start, not a request; loaded again
    # when `keys rotate-command-key --switch` replaces the file
    app.state.command_key = command_key.key_file(settings)
    app.state.command_publisher = None  # ``fleet serve`` sets it (woken by new commands)
    app.state.ingest_worker = None  # ``fleet serve`` sets it (``/ready`` reports it)
    app.state.broker_access = BrokerAccess.from_settings(settings)
    app.state.auth_limiter = TokenBucketLimiter(lim.auth_fail_burst, lim.auth_fail_per_s,
                                                lim.rate_limit_clients_max)
    app.state.enroll_limiter = TokenBucketLimiter(lim.enroll_burst, lim.enroll_per_s,
                                                  lim.rate_limit_clients_max)
    app.state.download_budget = DownloadBudget(
        lim.ota_download_requests_burst, lim.ota_download_requests_per_s,
        lim.ota_download_bytes_burst, lim.ota_download_bytes_per_s,
        lim.ota_download_devices_max)
    for router in ROUTERS:
        app.include_router(router)
    # open data: public, read-only, no token (``opendata``); off without its secret file
    app.state.opendata = OpenData.from_settings(settings, engine)
    app.include_router(opendata_routes.router)
    app.include_router(opendata_routes.bulk_router)
    metrics.instrument(app)

    make_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = docs.add_bearer_scheme(
                errors.public_openapi(make_openapi),
                [route for router in ROUTERS for route in router.routes])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    docs.mount_docs(app, app.title)
    install_console(app)  # the web console's pages (not in the API's schema)

    @app.middleware("http")
    async def refuse_control_characters(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Path and query parameters obey the same text rule as request bodies."""
        texts = [request.url.path, *request.query_params.keys(), *request.query_params.values()]
        if any(CONTROL_CHARACTERS.search(t) for t in texts):
            return JSONResponse({"detail": "control characters in the URL"}, status_code=400)
        return await call_next(request)

    # added last, so it is the outermost of our middleware: no byte of a body over its
    # route's limit reaches anything else
    app.add_middleware(BodyLimits, default=lim.body_max_bytes, routes=route_limits(lim))
    return app
