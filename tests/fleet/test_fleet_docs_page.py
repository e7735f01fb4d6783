"""The API docs page works on an isolated network: its HTML names no other host, its
script and style sheet come from the fleet itself, and the OpenAPI document declares the
bearer scheme (so the page's "Authorize" takes a token) on exactly the operations with a
role check. Before, the page loaded Swagger UI from a public CDN and had no token field."""

from __future__ import annotations

import re

import pytest

from cityedge_fleet.api.docs import ASSETS_URL, SCHEME
from cityedge_fleet.models import Role

from support.fleet import Api

URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)""")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_docs_page_references_no_external_host(api: Api) -> None:
    page = api.client.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE), html
    refs = [a or b for a, b in URL.findall(html)]
    assert refs and all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    assert "url: '/openapi.json'" in html
    for ref in refs:
        got = api.client.get(ref)
        assert got.status_code == 200, ref
        assert got.content  # served from the installed swagger-ui package
    assert api.client.get("/redoc").status_code == 404  # ReDoc is a CDN script: off


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_only_the_pages_assets_are_served(api: Api) -> None:
    assert api.client.get(ASSETS_URL + "/swagger-ui-bundle.js").status_code == 200
    for other in ("index.html", "swagger-initializer.js", "oauth2-redirect.html",
                  "../__init__.py", "%2e%2e/__init__.py"):
        assert api.client.get(ASSETS_URL + "/" + other).status_code in (400, 404), other


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_openapi_document_has_the_bearer_scheme_where_a_token_is_needed(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"][SCHEME] == {
        "type": "http", "scheme": "bearer", "description": schema["components"][
            "securitySchemes"][SCHEME]["description"]}
    public = {("get", "/health"), ("get", "/ready"), ("post", "/enroll"),
              ("post", "/enroll/ticket"), ("get", "/ca/crl"), ("get", "/ca/bundle"),
              ("get", "/ca/fleet-keys"),
              # a device's update download: the capability is the token in the URL
              ("get", "/ota/d/{token}/manifest"), ("get", "/ota/d/{token}/keys"),
              ("get", "/ota/d/{token}/artifact")}
    secured = 0
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if (method, path) in public:
                assert "security" not in op, (method, path)
            else:
                assert op.get("security") == [{SCHEME: []}], (method, path)
                secured += 1
    assert secured >= 14
    # a call as the docs page makes it once a token is entered under the scheme
    assert api.client.get("/devices", headers=api.headers(Role.admin)).status_code == 200
