"""Error bodies of the API: a 422 lists where, what and which kind, never the input.

FastAPI's default 422 body carries each error's ``input`` (and ``ctx``), so a request
with one bad field had its enrollment token or CSR echoed back, into whatever logs the
response. ``validation_error`` answers ``{"detail": [{"loc", "msg", "type"}]}`` only (a
message that quotes the input has it cut out); ``http_error`` gives every other 422 a
route raises with a text detail the same shape, and ``public_openapi`` documents exactly
that shape (``additionalProperties: false``), so the schema and the answers agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from cityedge_fleet.body_limits import too_large

ERROR_FIELDS = ("loc", "msg", "type")
INPUT_QUOTE_MIN_CHARS = 4  # shorter inputs are cut out of no message ("a" is in every one)


def public_error(err: Any) -> dict[str, Any]:
    """One validation error as the API shows it: location, message, type."""
    loc = [part if isinstance(part, int) else str(part) for part in err.get("loc", ())]
    msg = str(err.get("msg", ""))
    value = err.get("input")
    if isinstance(value, str) and len(value) >= INPUT_QUOTE_MIN_CHARS and value in msg:
        msg = msg.replace(value, "<input>")
    return {"loc": loc, "msg": msg, "type": str(err.get("type", "value_error"))}


def public_errors(errors: Iterable[Any]) -> list[dict[str, Any]]:
    return [public_error(err) for err in errors]


def invalid(loc: Sequence[str | int], msg: str) -> HTTPException:
    """A 422 a route raises itself, in the shape of a validation error."""
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         [{"loc": list(loc), "msg": msg, "type": "value_error"}])


async def validation_error(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"detail": public_errors(errors)},
                        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_422_UNPROCESSABLE_CONTENT and isinstance(exc.detail, str):
        exc = invalid(["body"], exc.detail)  # a 422 raised with a text detail
    limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
    if exc.status_code == status.HTTP_413_CONTENT_TOO_LARGE and isinstance(limit, int):
        exc = HTTPException(exc.status_code, too_large(limit))  # a streamed body's 413
    return await http_exception_handler(request, exc)


HTTP_ERROR_SCHEMA = {  # what an HTTPException answers (every error but a 422)
    "title": "HTTPError", "type": "object", "required": ["detail"],
    "properties": {"detail": {"title": "Detail", "type": "string"}},
}


def public_openapi(make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's schema with ``ValidationError`` as this API answers it (no ``input`` or
    ``ctx``, nothing else), and a body for every error response a route declared without
    one: a 422 is an ``HTTPValidationError`` (``http_error``), any other an ``HTTPError``."""
    schema = make()
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = components.get("ValidationError")
    if error is not None:
        error["properties"] = {k: v for k, v in error["properties"].items()
                               if k in ERROR_FIELDS}
        error["additionalProperties"] = False
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            for code, response in op.get("responses", {}).items():
                if not code.isdigit() or int(code) < 400 or "content" in response:
                    continue
                name = "HTTPValidationError" if code == "422" else "HTTPError"
                if name == "HTTPError":
                    components.setdefault("HTTPError", HTTP_ERROR_SCHEMA)
                elif name not in components:
                    continue
                response["content"] = {"application/json": {
                    "schema": {"$ref": "#/components/schemas/%s" % name}}}
                response.setdefault("description", "Error")
    return schema
