"""An HTTPS artifact server for the update tests: Range support, a log of every request's
``Range`` header, and the misbehaviours a device must survive.

``ArtifactServer(pki, body)`` serves ``body`` at ``.url`` over TLS with the test PKI's
server certificate (127.0.0.1). ``mode`` chooses what it does:

- ``normal``: ``Range: bytes=N-`` answered 206 with ``Content-Range``, else 200;
- ``ignore-range``: always 200 with the whole body (a server without Range support);
- ``wrong-range``: 206 whose ``Content-Range`` starts at 0 whatever was asked;
- ``endless-declared``: declares and sends the body plus more (``Content-Length`` too big);
- ``endless-stream``: no ``Content-Length``; the body, then more bytes until the client
  hangs up (bounded at 64 times the body);
- ``trickle``: ``trickle_bytes`` every ``trickle_every_s`` (slow retrieval);
- ``stall``: headers, then nothing until the client gives up.

``cut_after``: in ``normal`` mode, the connection is dropped once the body has been sent up
to that absolute offset (a lost link); it applies to the next response only.

A bounded range (``bytes=N-M``, the device's requests) is answered with bytes N..M.
``files``: other paths it serves whole-or-ranged in ``normal`` mode (a release folder: the
device GETs ``<folder>manifest`` and ``<folder>keys`` beside ``<folder>artifact``, the
body); ``paths`` logs the path of every request, in step with ``log``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support.mosquitto import TestPKI

_RANGE = re.compile(r"bytes=(\d+)-(\d*)\Z")
_ACCEPT_POLL_S = 0.5  # the listening socket's timeout: shutdown() is seen at least this often
_HANDSHAKE_S = 10.0  # a connection that does not finish its TLS handshake is dropped


class _TlsServer(ThreadingHTTPServer):
    """HTTPS with the TLS handshake in each connection's own thread. (A listening socket
    wrapped by ``ssl`` shakes hands inside ``accept``, on the one serving thread: a client
    that never finishes its handshake, or an aborted connection, held that thread, and
    ``shutdown()`` waited for it forever.)"""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: Any, ctx: ssl.SSLContext) -> None:
        super().__init__(addr, handler)
        self.ctx = ctx
        self.socket.settimeout(_ACCEPT_POLL_S)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(_HANDSHAKE_S)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: a client that is not ours
            return
        self.RequestHandlerClass(tls, client_address, self)


class ArtifactServer:
    def __init__(self, pki: TestPKI, body: bytes, mode: str = "normal",
                 files: dict[str, bytes] | None = None) -> None:
        self.body = body
        self.files = files or {}
        self.paths: list[str] = []
        self.mode = mode
        self.cut_after: int | None = None
        self.trickle_bytes = 16
        self.trickle_every_s = 0.02
        self.log: list[str | None] = []  # each request's Range header (None: none)
        self.stop_event = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                outer.paths.append(self.path)
                outer.log.append(self.headers.get("Range"))
                with contextlib.suppress(OSError):  # the client hung up: its choice
                    outer._answer(self)
                self.close_connection = True

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server.cert_pem), str(pki.server.key_pem))
        self.httpd = _TlsServer(("127.0.0.1", 0), Handler, ctx)
        self.port = self.httpd.server_address[1]
        self.url = "https://127.0.0.1:%d/releases/gateway.tar.gz" % self.port
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ArtifactServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        body, mode = self.body, self.mode
        name = h.path.rsplit("/", 1)[-1]
        if name in self.files:
            body, mode = self.files[name], "normal"
        m = _RANGE.match(h.headers.get("Range") or "")
        start = int(m[1]) if m else 0
        top = len(body)  # bytes=N-M: up to M
        if m and m[2]:
            top = min(top, int(m[2]) + 1)
        if mode == "normal" and m and start >= len(body):
            h.send_response(416)
            h.send_header("Content-Range", "bytes */%d" % len(body))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if mode in ("normal", "wrong-range") and m:
            shown = 0 if mode == "wrong-range" else start
            h.send_response(206)
            h.send_header("Content-Range", "bytes %d-%d/%d" % (shown, top - 1, len(body)))
            payload = body[start:top]
        else:
            h.send_response(200)
            start, payload = 0, body
        if mode == "endless-declared":
            payload = body + b"\0" * 4096
        if mode != "endless-stream":
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        w = h.wfile
        if mode == "endless-stream":
            w.write(body)
            for _ in range(64):
                w.write(b"\0" * len(body))
            return
        if mode == "trickle":
            for i in range(0, len(payload), self.trickle_bytes):
                if self.stop_event.wait(self.trickle_every_s):
                    return
                w.write(payload[i:i + self.trickle_bytes])
                w.flush()
            return
        if mode == "stall":
            w.flush()
            self.stop_event.wait(30)
            return
        cut = None
        if name not in self.files:  # the artifact's next response, not a folder file's
            cut, self.cut_after = self.cut_after, None
        if cut is not None and start < cut < start + len(payload):
            w.write(payload[:cut - start])
            w.flush()
            # a link lost mid-body: the socket goes away without TLS's close_notify
            conn: socket.socket = h.connection
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            return
        w.write(payload)
