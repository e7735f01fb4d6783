"""The fleet service's FastAPI application: ``create_app(settings)``.

The factory opens the database, applies the migrations, creates the rate limiters and
mounts the routers. It does not start the ingest worker or the CRL refresher: ``fleet
serve`` does (``cityedge_fleet.serve``), so tests can build an app without MQTT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from cityedge_fleet.api import audit_routes, devices, enroll_routes, enroll_ticket, tokens
from cityedge_fleet.broker_sync import BrokerAccess
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine, migrate
from cityedge_fleet.models import CONTROL_CHARACTERS
from cityedge_fleet.ratelimit import TokenBucketLimiter

health_router = APIRouter(tags=["health"])


@health_router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


ROUTERS = (health_router, tokens.router, devices.router, enroll_routes.router,
           enroll_ticket.router, audit_routes.router)


def create_app(settings: Settings) -> FastAPI:
    engine = make_engine(settings)
    migrate(engine)
    app = FastAPI(
        title="cityedge fleet",
        summary="Device registry, CA, gated enrollment, audit log and verified readings.",
        version="0.1.0",
    )
    lim = settings.limits
    app.state.settings = settings
    app.state.engine = engine
    app.state.broker_access = BrokerAccess.from_settings(settings)
    app.state.auth_limiter = TokenBucketLimiter(lim.auth_fail_burst, lim.auth_fail_per_s,
                                                lim.rate_limit_clients_max)
    app.state.enroll_limiter = TokenBucketLimiter(lim.enroll_burst, lim.enroll_per_s,
                                                  lim.rate_limit_clients_max)
    for router in ROUTERS:
        app.include_router(router)

    @app.middleware("http")
    async def refuse_control_characters(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Path and query parameters obey the same text rule as request bodies."""
        texts = [request.url.path, *request.query_params.keys(), *request.query_params.values()]
        if any(CONTROL_CHARACTERS.search(t) for t in texts):
            return JSONResponse({"detail": "control characters in the URL"}, status_code=400)
        return await call_next(request)

    return app
