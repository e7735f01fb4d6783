"""The API docs page (``/docs``) with its assets served by the fleet itself, and the
OpenAPI document's bearer scheme.

FastAPI's default page loads Swagger UI from a public CDN: on a city's isolated network it
stays blank, and a CDN that serves other script would run with the page's origin (the
operator's token typed into it included). Here the page and its script, style sheet and
icon come from this service (``/docs/assets/``, the files of the pinned PyPI package
``swagger-ui-bundle-v2``), and no other host is named. ReDoc (also a CDN script) is off.

``add_bearer_scheme`` declares the ``Authorization: Bearer <token>`` scheme the API uses
(``auth``) and marks every operation that needs a token (a route with a role check), so
the page's "Authorize" button takes a token (``cityedge fleet create-token``) and the
calls it tries carry it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from cityedge_fleet.auth import allowed_roles_of

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
SCHEME = "bearerToken"
# the files of the Swagger UI distribution the page needs (nothing else is served)
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def mount_docs(app: FastAPI, title: str) -> None:
    """``/docs`` and its assets from the installed swagger-ui package."""
    import swagger_ui_bundle

    static = StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path))

    async def assets(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"].rsplit("/", 1)[-1] not in ASSETS:
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
            return
        await static(scope, receive, send)

    app.mount(ASSETS_URL, assets, name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=title + " - API",
            swagger_js_url=ASSETS_URL + "/swagger-ui-bundle.js",
            swagger_css_url=ASSETS_URL + "/swagger-ui.css",
            swagger_favicon_url=ASSETS_URL + "/favicon-32x32.png",
            # a token typed in is kept for this page only, not in the browser's storage
            swagger_ui_parameters={"persistAuthorization": False})


def _needs_token(route: APIRoute) -> bool:
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if allowed_roles_of(dep.call) is not None:
            return True
        stack.extend(dep.dependencies)
    return False


def add_bearer_scheme(schema: dict[str, Any], routes: list[Any]) -> dict[str, Any]:
    """The bearer scheme in ``components`` and on each operation that needs a token
    (``routes``: the routers' own routes; FastAPI's ``app.routes`` nests included routers)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "An API token (`cityedge fleet create-token`); its role decides "
                       "what it may do."}
    paths = schema.get("paths", {})
    for route in routes:
        if not isinstance(route, APIRoute) or not _needs_token(route):
            continue
        for method in route.methods or ():
            op = paths.get(route.path_format, {}).get(method.lower())
            if op is not None:
                op["security"] = [{SCHEME: []}]
    return schema
