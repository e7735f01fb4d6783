"""The gateway's download attack server: ``ArtifactServer`` (HTTPS on loopback, Range, the
log of every request's ``Range``) with a script of misbehaviours, one per request for the
artifact, so a test drives one download call through several failures in a row.

``FlakyArtifactServer(pki, body, script=[...])``: each request for the artifact takes the
next step of ``script``; once the script is used up the server answers as ``mode`` says
(``normal`` by default). The folder's other files (``files``: manifest, keys) have scripts
of their own, ``file_script`` (name -> steps; ``Status`` only), then are served whole.
Steps:

- ``Cut(at)``: a normal answer whose connection is dropped once the body reached the
  absolute offset ``at`` (no TLS close_notify: a lost link);
- ``Stall(at)``: a normal answer that stops sending at offset ``at`` and holds the
  connection open (a stalled server: only the client's read timeout ends it);
- ``Status(code, retry_after)``: ``code`` with an empty body and, if given, that
  ``Retry-After`` header (a 503 of a busy server, the fleet's 429 of
  ``ratelimit.DownloadBudget``);
- ``Mode(name)``: one answer in another ``ArtifactServer`` mode (``ignore-range``,
  ``wrong-range``, ``trickle``, ...);
- ``Shifted()``: 206 whose ``Content-Range`` names the bytes asked, but whose body is the
  artifact from byte 0 (a lie only the digest can catch);
- ``Overlong(n)``: 206 whose ``Content-Range`` names ``n`` bytes from the offset asked, but
  no ``Content-Length`` and the whole rest of the artifact (more than the range it vouched
  for);
- ``LengthLie(n)``: 206 with the right ``Content-Range`` to the end, but a
  ``Content-Length`` ``n`` bytes shorter than it.

``statuses`` lists the status code of every artifact answer, in step with ``log``'s entries
for the artifact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from support.artifact_server import ArtifactServer
from support.mosquitto import TestPKI

_RANGE = re.compile(r"bytes=(\d+)-\Z")


@dataclass(frozen=True)
class Cut:
    at: int


@dataclass(frozen=True)
class Stall:
    at: int


@dataclass(frozen=True)
class Status:
    code: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Mode:
    name: str


@dataclass(frozen=True)
class Shifted:
    pass


@dataclass(frozen=True)
class Overlong:
    n: int


@dataclass(frozen=True)
class LengthLie:
    n: int


Step = Cut | Stall | Status | Mode | Shifted | Overlong | LengthLie


class FlakyArtifactServer(ArtifactServer):
    def __init__(self, pki: TestPKI, body: bytes, script: list[Step] | None = None,
                 files: dict[str, bytes] | None = None,
                 file_script: dict[str, list[Status]] | None = None) -> None:
        self.script: list[Step] = list(script or [])
        self.file_script = {k: list(v) for k, v in (file_script or {}).items()}
        self.statuses: list[int] = []
        super().__init__(pki, body, files=files)

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.rsplit("/", 1)[-1]
        if self.file_script.get(name):
            self._status(h, self.file_script[name].pop(0))
            return
        if h.path.rsplit("/", 1)[-1] in self.files or not self.script:
            if h.path.rsplit("/", 1)[-1] not in self.files:
                self.statuses.append(200 if h.headers.get("Range") is None
                                     or self.mode == "ignore-range" else 206)
            super()._answer(h)
            return
        step = self.script.pop(0)
        m = _RANGE.match(h.headers.get("Range") or "")
        start = int(m[1]) if m else 0
        body = self.body
        if isinstance(step, Cut):
            self.statuses.append(206 if m else 200)
            self.cut_after = step.at
            super()._answer(h)
        elif isinstance(step, Mode):
            self.statuses.append(200 if step.name == "ignore-range" or not m else 206)
            mode, self.mode = self.mode, step.name
            try:
                super()._answer(h)
            finally:
                self.mode = mode
        elif isinstance(step, Status):
            self.statuses.append(step.code)
            self._status(h, step)
        elif isinstance(step, Stall):
            self._head(h, start, len(body) - 1, len(body) - start, m is not None)
            h.wfile.write(body[start:step.at])
            h.wfile.flush()
            self.stop_event.wait(60)  # until the client hangs up and the test ends
        elif isinstance(step, Shifted):
            self._head(h, start, len(body) - 1, len(body) - start, True)
            h.wfile.write(body[:len(body) - start])
        elif isinstance(step, Overlong):
            self._head(h, start, start + step.n - 1, None, True)
            h.wfile.write(body[start:])  # the body ends where the connection does
        elif isinstance(step, LengthLie):
            self._head(h, start, len(body) - 1, len(body) - start - step.n, True)
            h.wfile.write(body[start:len(body) - step.n])

    @staticmethod
    def _status(h: BaseHTTPRequestHandler, step: Status) -> None:
        h.send_response(step.code)
        if step.retry_after is not None:
            h.send_header("Retry-After", step.retry_after)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _head(self, h: BaseHTTPRequestHandler, first: int, last: int, length: int | None,
              ranged: bool) -> None:
        self.statuses.append(206 if ranged else 200)
        h.send_response(206 if ranged else 200)
        if ranged:
            h.send_header("Content-Range", "bytes %d-%d/%d" % (first, last, len(self.body)))
        if length is not None:
            h.send_header("Content-Length", str(length))
        h.end_headers()
