"""Request bodies are limited per route before anything parses them: an anonymous 20 MiB
body (declared or streamed without a Content-Length) is refused with 413, and the app's
memory does not grow by the body's size; the largest legitimate bodies still pass."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from cityedge_fleet.body_limits import route_limits
from cityedge_fleet.models import Role

from support.fleet import Api
from support.mosquitto import free_port

MIB = 1024 * 1024
ATTACK_BYTES = 20 * MIB  # the finding's body: ~400 MB of server memory once parsed
CHUNK = 64 * 1024  # bytes per received chunk (uvicorn reads up to 64 KiB at a time)
WORKING_SET = MIB  # bytes: a request's own allocations, far above the measured ~0.1 MiB


def _json_list_chunks(total: int) -> Iterator[bytes]:
    """A valid JSON body of ``total`` bytes in CHUNK pieces: a list of short serials,
    the kind of body that costs the most once parsed."""
    item = b'"SN-00000000",'
    body = item * (CHUNK // len(item))
    yield b'{"manifest": "m", "serials": [' + body
    sent = CHUNK
    while sent < total:
        yield bytes(memoryview(body))  # a new object each time, as a server's reads are
        sent += len(body)
    yield b'"SN-1"]}'


class AsgiPost:
    """One POST driven straight into the ASGI app, its body pulled chunk by chunk: counts
    the chunks the app asked for and measures the peak memory allocated meanwhile."""

    def __init__(self, app: Any, path: str, chunks: Iterator[bytes],
                 content_length: int | None = None) -> None:
        self.app = app
        self.path = path
        self.chunks = chunks
        self.content_length = content_length
        self.pulled = 0
        self.status = 0
        self.body = b""

    async def _run(self) -> None:
        done = False

        async def receive() -> dict[str, Any]:
            nonlocal done
            if done:
                await asyncio.sleep(3600)  # no disconnect: the app must not need one
            chunk = next(self.chunks, None)
            if chunk is None:
                done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            self.pulled += 1
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")

        headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
        if self.content_length is not None:
            headers.append((b"content-length", str(self.content_length).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": self.path,
                 "raw_path": self.path.encode(), "root_path": "", "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 40000),
                 "server": ("testserver", 80)}
        await self.app(scope, receive, send)

    def run(self) -> int:
        """Peak bytes allocated while the request ran."""
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            asyncio.run(self._run())
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


@pytest.mark.parametrize("path", ["/devices", "/enrollment/manifests"])
def test_a_streamed_oversized_body_is_refused_without_holding_it(api: Api, path: str) -> None:
    limit = route_limits(api.settings.limits).get(("POST", path),
                                                  api.settings.limits.body_max_bytes)
    warm = AsgiPost(api.client.app, path, iter([b"{}"]))
    warm.run()  # first request: lazy imports and caches are not the body's cost
    small = AsgiPost(api.client.app, path, iter([b'{"serials": ["a"]}']))
    baseline = small.run()
    assert small.status == 401  # anonymous: parsed, then refused by authentication
    attack = AsgiPost(api.client.app, path, _json_list_chunks(ATTACK_BYTES))
    peak = attack.run()
    assert attack.status == 413
    assert json.loads(attack.body) == {"detail": "request body larger than %d bytes" % limit}
    # the app stopped asking for the body at the first chunk past the limit
    assert attack.pulled <= limit // CHUNK + 2, attack.pulled
    # so it held at most the limit and that chunk: not the 20 MiB, let alone its parse
    assert peak < limit + CHUNK + WORKING_SET, (peak, baseline, limit)


def test_a_declared_oversized_body_is_refused_before_a_byte_is_read(api: Api) -> None:
    limits = api.settings.limits
    for path, limit in [("/devices", limits.body_max_bytes),
                        ("/enroll", limits.enroll_body_max_bytes),
                        ("/enrollment/manifests", limits.manifest_body_max_bytes)]:
        post = AsgiPost(api.client.app, path, _json_list_chunks(ATTACK_BYTES),
                        content_length=limit + 1)
        post.run()
        assert (post.status, post.pulled) == (413, 0), path
        r = api.client.post(path, content=b"x" * (limit + 1),
                            headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json() == {"detail": "request body larger than %d bytes" % limit}


def test_the_largest_legitimate_bodies_fit(api: Api) -> None:
    lim = api.settings.limits
    devices = [{"serial": "S%0*d" % (lim.text_max_chars - 1, i), "claim_sha256": "%064x" % i}
               for i in range(lim.manifest_max_serials)]
    r = api.client.post("/enrollment/manifests", json={"manifest": "m" * lim.text_max_chars,
                                                       "devices": devices},
                        headers=api.headers(Role.technician))
    assert r.status_code == 201, r.text[:300]
    assert r.json()["added"] == lim.manifest_max_serials
    # a CSR-sized PEM of short lines (the most JSON escapes) reaches the CSR check
    pem = ("A" * 63 + "\n") * (lim.csr_max_bytes // 64)
    r = api.client.post("/enroll", json={"serial": "S" * lim.text_max_chars,
                                         "token": "t" * 128, "csr_pem": pem})
    assert r.status_code == 403, r.text[:300]  # unknown serial: past the body limit
    tags = ["\u6c34" * lim.text_max_chars for _ in range(lim.tags_max)]  # 3 UTF-8 bytes each
    body = {"id": "urn:dev:mac:" + "0" * 116, "serial": "s" * 128, "model": "m" * 128,
            "hardware_class": "h" * 128, "site": "\u6c34" * 128, "tags": tags}
    r = api.client.post("/devices", json=body, headers=api.headers(Role.technician))
    assert r.status_code == 201, r.text[:300]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_uvicorn_answers_413_before_the_client_sends_the_body(api: Api) -> None:
    """Over a real socket: the headers announce 20 MiB; the 413 comes back while not one
    byte of the body has been sent."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.client.app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /enrollment/manifests HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % ATTACK_BYTES)
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413 "), answer
    finally:
        server.should_exit = True
        thread.join(10)
