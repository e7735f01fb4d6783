"""Request body limits per route, enforced as the bytes arrive, before anything parses them.

FastAPI reads and parses a JSON body before any dependency runs, authentication and rate
limits included: without a limit one anonymous 20 MiB body cost ~400 MB of memory. Here
Starlette's ``RequestBodyLimitMiddleware`` counts the bytes for each request with the
limit of its route (``route_limits``, from ``FleetLimits``; ``body_max_bytes`` for every
other route): a declared ``Content-Length`` over the limit is refused before a byte of the
body is read (by ``BodyLimits`` itself, before any route, authentication or database work),
a streamed (chunked) body as soon as the bytes received pass it, so at most
the limit plus one received chunk is ever held. Either way the answer is 413 with
``{"detail": "request body larger than N bytes"}``.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from cityedge_fleet.config import FleetLimits


def route_limits(limits: FleetLimits) -> dict[tuple[str, str], int]:
    """(method, path) -> bytes, for the routes whose bodies need more than the default."""
    return {
        ("POST", "/enroll"): limits.enroll_body_max_bytes,
        ("POST", "/enroll/ticket"): limits.enroll_body_max_bytes,
        ("POST", "/enrollment/manifests"): limits.manifest_body_max_bytes,
        ("POST", "/hw/reports"): limits.hw_report_max_bytes,
        ("PUT", "/ota/artifacts"): limits.ota_artifact_max_bytes,
        ("POST", "/ota/releases"): limits.ota_release_body_max_bytes,
    }


class BodyLimits:
    """ASGI middleware: the body limit of the request's route (413 beyond it)."""

    def __init__(self, app: ASGIApp, *, default: int,
                 routes: Mapping[tuple[str, str], int]) -> None:
        self.app = app
        self.default = default
        self.routes = dict(routes)

    def limit_for(self, method: str, path: str) -> int:
        return self.routes.get((method, path), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # refused before anything runs: no route, no authentication, no database
            response = JSONResponse({"detail": too_large(limit)}, status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, limit)(scope, receive, send)


def too_large(limit: int) -> str:
    return "request body larger than %d bytes" % limit
