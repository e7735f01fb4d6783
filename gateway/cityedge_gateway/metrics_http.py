"""A minimal HTTP server for Prometheus: ``GET /metrics`` on 127.0.0.1 only.

Plain asyncio streams, one request per connection, bounded request size and read time;
anything but ``GET /metrics`` gets 404. It listens on loopback only: metrics reveal the
site's layout, so exposing them is a deliberate step (a reverse proxy), not a default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

REQUEST_MAX_BYTES = 8192  # bytes: request line plus headers
REQUEST_TIMEOUT_S = 5.0  # seconds: to receive the request
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def serve_metrics(port: int, render: Callable[[], str]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) == 3 and parts[0] == b"GET" and parts[1] == b"/metrics":
            status, body, ctype = "200 OK", render().encode(), CONTENT_TYPE
        else:
            status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status.encode(), ctype.encode(), len(body))
            + body
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, limit=REQUEST_MAX_BYTES)
