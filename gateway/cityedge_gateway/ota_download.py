"""Fetching a release's artifact: resumable, bounded, hashed as it is written.

``download(release, part, ca_file=...)`` brings the artifact into the file ``part`` with
HTTP/1.1 GET over TLS (verified against ``ca_file`` only: the city's CA, no system store),
asking ``Range: bytes=N-`` for what it already holds. It returns when ``part`` holds
exactly ``release.size`` bytes whose SHA-256 is ``release.sha256``.

Resuming. Beside ``part`` a small progress record (``<part>.progress``, JSON, written
atomically) names the release (sequence, size, digest, URL) and ``durable_bytes``: how many
bytes of ``part`` were fsynced when it was written. A reboot, a killed process or a lost
link resumes from there: the file is cut back to ``durable_bytes`` (anything after it may
be torn) and the next request asks for the rest. A record for another release, or none,
starts from zero.

Hashing on resume: hashlib cannot export a SHA-256 state, and a state saved by other means
would be one more thing to trust after a power cut. So the partial file is read back and
hashed again before the download goes on: a second of SD-card reads for 50 MB, against a
link that is the slow part anyway. Every byte then goes through the hash as it is written,
and the digest is compared once the size is reached.

Bounds (``limits.OTA_*``, overridable per call with ``DownloadLimits``):

- **endless data**: never more than ``release.size`` bytes are written; a response that
  declares or sends more, or a ``Content-Range`` whose total is not the release size, is
  refused (``endless-data``, ``bad-content-range``), and the partial file is removed;
- **slow retrieval**: a connect timeout, a read timeout (no bytes for that long), a minimum
  rate judged over each rate window, and a deadline for the whole call
  (``slow-retrieval``); the partial file is kept, so a later call resumes;
- a server that ignores ``Range`` (200 to a ranged request) is taken from byte 0 again
  (the partial file is emptied and the hash restarted); a ``206`` whose range does not
  start where we asked is refused (``bad-content-range``);
- a ``206`` whose ``Content-Length`` is not the length of its ``Content-Range``, or that
  sends more than that range, is refused (``bad-content-range``): the bytes would land at
  offsets the server did not vouch for. A server that labels the right range but sends
  other bytes is caught by the digest at the end (``hash-mismatch``, the file removed);
- at most ``OTA_REQUESTS_MAX`` requests per call, retries included.

Retrying. A request the transport failed (the link cut mid-body, no bytes for
``read_timeout_s``, a 5xx, a 429) is tried again within the same call, resuming with
``Range`` from the bytes already written: after a wait from ``cityedge_host.backoff``
(``retry_first_s`` doubling up to ``retry_max_s``, jittered), and never sooner than the
server's ``Retry-After`` (seconds or an HTTP date; the fleet's ``ratelimit.DownloadBudget``
sends one with its 429). A ``Retry-After`` beyond ``OTA_RETRY_AFTER_MAX_S``, or a wait that
would end past the call's ``deadline_s``, gives up at once rather than sleep. The call gives
up after ``attempts_max`` failed requests in a row; a request that brought new bytes starts
that count (and the backoff) again, so a link that keeps breaking but keeps delivering is
bounded by the deadline and ``requests_max`` instead. A refusal is never retried.

``stop`` (a ``threading.Event``: the download runs in a thread of the service) ends the
call between two chunks or during a wait (``stopped``, progress kept), so a gateway told to
stop does not sit out a ``Retry-After`` until systemd kills it.

Progress: every request, response, retry and the result are ``DownloadEvent``s, given to
``observe`` (tests, the bench) and logged, with the bytes held and the percentage; the
body's progress is logged at each tenth of the artifact.

Errors say who is at fault: ``DownloadRefused`` (the server or its data broke a rule; a
retry against the same server will not help without a change there) and
``DownloadInterrupted`` (the transport failed and the retries ran out: the link, a 5xx, a
429, a read that timed out; progress kept, call again to resume). Both carry a short
``reason`` word for the status.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from cityedge_host.backoff import Backoff
from cityedge_host.files import write_atomic

from . import limits
from .ota_release import VerifiedRelease

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d{1,15})-(\d{1,15})/(\d{1,15}|\*)\Z")
_PROGRESS_STEPS = 10  # the body's progress is logged at each tenth of the artifact


@dataclass(frozen=True)
class DownloadLimits:
    connect_timeout_s: float = limits.OTA_CONNECT_TIMEOUT_S
    read_timeout_s: float = limits.OTA_READ_TIMEOUT_S
    deadline_s: float = limits.OTA_DOWNLOAD_DEADLINE_S
    min_rate_bytes_s: int = limits.OTA_MIN_RATE_BYTES_S
    rate_window_s: float = limits.OTA_RATE_WINDOW_S
    sync_every_bytes: int = limits.OTA_SYNC_EVERY_BYTES
    requests_max: int = limits.OTA_REQUESTS_MAX
    attempts_max: int = limits.OTA_DOWNLOAD_ATTEMPTS_DEFAULT
    retry_first_s: float = limits.OTA_RETRY_FIRST_S
    retry_max_s: float = limits.OTA_RETRY_MAX_DEFAULT_S
    retry_after_max_s: float = limits.OTA_RETRY_AFTER_MAX_S


# DownloadEvent.kind
REQUEST = "request"  # a GET is sent; ``offset``: the byte it asks from (0: the whole)
RESPONSE = "response"  # its status and headers were accepted; ``status``
RESTART = "restart"  # the server ignored Range: back to byte 0
RETRY = "retry"  # the request failed (``reason``); the next one after ``wait_s``
DONE = "done"  # the artifact is whole and its SHA-256 holds; ``sha256`` (hex)
GAVE_UP = "gave-up"  # the call ends with ``reason`` (the error follows)


@dataclass(frozen=True)
class DownloadEvent:
    """One step of a download call; ``offset``: bytes of the artifact held at that point."""

    kind: str
    attempt: int  # the request's number in this call, from 1
    offset: int
    size: int
    status: int | None = None
    reason: str = ""
    detail: str = ""
    wait_s: float = 0.0
    sha256: str = ""


Observer = Callable[[DownloadEvent], None]


class DownloadError(Exception):
    """``reason``: one word for the status; the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("%s: %s" % (reason, message))
        self.reason = reason
        self.message = message


class DownloadRefused(DownloadError):
    """The server or the data it sent broke a rule."""


class DownloadInterrupted(DownloadError):
    """The transport failed; the progress is kept and a new call resumes.
    ``retry_after``: the seconds the server asked to wait (its ``Retry-After``), if any."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(reason, message)
        self.retry_after = retry_after


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (RFC 9110 §10.2.3: delay-seconds or an
    HTTP date); None when absent or not readable (the backoff alone decides then)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value[:12]))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def progress_path(part: Path) -> Path:
    return part.with_name(part.name + ".progress")


def _identity(release: VerifiedRelease) -> dict[str, Any]:
    return {"sequence": release.sequence, "size": release.size,
            "sha256": release.sha256.hex(), "url": release.url}


def durable_bytes(release: VerifiedRelease, part: Path) -> int:
    """How many bytes of ``part`` a progress record for ``release`` vouches for (0: none)."""
    try:
        rec = json.loads(progress_path(part).read_bytes())
    except (OSError, ValueError):
        return 0
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in _identity(release).items()):
        return 0
    n = rec.get("durable_bytes")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= release.size:
        return 0
    return n


def discard(part: Path) -> None:
    """Remove the partial file and its progress record."""
    for p in (part, progress_path(part)):
        p.unlink(missing_ok=True)


class _Sink:
    """The partial file, its running hash and its progress record."""

    def __init__(self, release: VerifiedRelease, part: Path, f: BinaryIO, sync_every: int):
        self.release = release
        self.part = part
        self.f = f
        self.sync_every = sync_every
        self.hash = hashlib.sha256()
        self.offset = 0
        self.durable = 0

    def resume(self) -> None:
        """Cut the file back to what the record vouches for and hash that again."""
        # a file shorter than its record (lost by the file system) counts for what it has;
        # never extend it: truncate() would pad it with zeros
        start = min(durable_bytes(self.release, self.part), os.fstat(self.f.fileno()).st_size)
        self.f.truncate(start)
        self.f.seek(0)
        left = start
        while left:
            block = self.f.read(min(left, 1024**2))
            self.hash.update(block)
            left -= len(block)
        self.offset = self.durable = start

    def restart(self) -> None:
        """Back to byte 0 (a server that ignored Range sends the whole artifact)."""
        self.f.seek(0)
        self.f.truncate(0)
        self.hash = hashlib.sha256()
        self.offset = 0
        self.sync()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.offset += len(data)
        if self.offset - self.durable >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        """fsync the data, then record that it is there (in that order)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.durable = self.offset
        rec = {**_identity(self.release), "durable_bytes": self.durable}
        write_atomic(progress_path(self.part), json.dumps(rec).encode(), 0o600)


def _tls(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _start_of_body(resp: httpx.Response, sink: _Sink, size: int) -> int:
    """Check the response's status and headers against what we asked; place the sink.
    Returns the offset the body must end at (the end of its range)."""
    asked = sink.offset
    code = resp.status_code
    if code >= 500 or code == 429:
        raise DownloadInterrupted("rate-limited" if code == 429 else "http-status",
                                  "the server answered %d" % code,
                                  retry_after_s(resp.headers.get("retry-after")))
    length = resp.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise DownloadRefused("bad-content-range", "Content-Length %r" % length[:20])
    if code == 200:
        if asked:
            log.warning("the server ignored Range (asked from byte %d): starting again", asked)
            sink.restart()
        end = size
    elif code == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        if m is None:
            raise DownloadRefused("bad-content-range", "206 without a byte Content-Range: %r"
                                  % resp.headers.get("content-range", "")[:80])
        first, last, total = int(m[1]), int(m[2]), m[3]
        if total != "*" and int(total) != size:
            raise DownloadRefused("bad-content-range", "the server's artifact is %s bytes, "
                                  "the release says %d" % (total, size))
        if first != asked or last < first or last >= size:
            raise DownloadRefused("bad-content-range", "asked bytes %d-, got %d-%d"
                                  % (asked, first, last))
        if length is not None and int(length) != last + 1 - first:
            raise DownloadRefused("bad-content-range", "Content-Range %d-%d is %d bytes, "
                                  "Content-Length says %s"
                                  % (first, last, last + 1 - first, length))
        end = last + 1
    else:
        raise DownloadRefused("http-status", "the server answered %d" % code)
    if length is not None and int(length) > size - sink.offset:
        raise DownloadRefused("endless-data", "Content-Length %s, but only %d bytes are due"
                              % (length, size - sink.offset))
    return end


def download(release: VerifiedRelease, part: Path, *, ca_file: Path,
             bounds: DownloadLimits | None = None,
             clock: Callable[[], float] = time.monotonic,
             observe: Observer | None = None,
             stop: threading.Event | None = None) -> Path:
    """Bring ``release``'s artifact into ``part`` (see the module's docstring)."""
    b = bounds or DownloadLimits()
    size = release.size
    part.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        sink = _Sink(release, part, f, b.sync_every_bytes)
        sink.resume()
        run = _Run(release, sink, ca_file, b, clock, observe, stop or threading.Event())
        if sink.offset:
            log.info("download of %s: resuming at byte %d of %d (%d%%)", release.version,
                     sink.offset, size, 100 * sink.offset // size)
        try:
            run.fetch()
        except DownloadError as e:
            run.emit(GAVE_UP, reason=e.reason, detail=str(e))
            if isinstance(e, DownloadRefused) and e.reason == "endless-data":
                discard(part)
            else:
                with contextlib.suppress(OSError):
                    sink.sync()  # what arrived is kept for the next call
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                sink.sync()
            raise
        sink.sync()
        digest = sink.hash.digest()
        if not hmac.compare_digest(digest, release.sha256):
            discard(part)
            run.emit(GAVE_UP, reason="hash-mismatch")
            raise DownloadRefused("hash-mismatch", "the %d bytes do not have the release's "
                                  "SHA-256; the partial file was removed" % size)
    progress_path(part).unlink(missing_ok=True)
    run.emit(DONE, sha256=digest.hex())
    return part


def _stopped() -> DownloadInterrupted:
    return DownloadInterrupted("stopped", "the gateway is stopping; the bytes are kept")


class _Run:
    """One download call: its requests, retries and events; ``stop`` (set by the service
    when it stops) ends a wait or a body at once."""

    def __init__(self, release: VerifiedRelease, sink: _Sink, ca_file: Path,
                 b: DownloadLimits, clock: Callable[[], float], observe: Observer | None,
                 stop: threading.Event) -> None:
        self.release = release
        self.sink = sink
        self.ca_file = ca_file
        self.b = b
        self.clock = clock
        self.observe = observe
        self.stop = stop
        self.attempt = 0
        self.started = clock()
        self.logged_step = 0

    def emit(self, kind: str, **fields: Any) -> None:
        ev = DownloadEvent(kind, self.attempt, self.sink.offset, self.release.size, **fields)
        pct = 100 * ev.offset // ev.size
        if kind == RETRY:
            log.warning("download of %s: request %d failed (%s), %d of %d bytes (%d%%); "
                        "again in %.1f s", self.release.version, ev.attempt, ev.detail,
                        ev.offset, ev.size, pct, ev.wait_s)
        elif kind == GAVE_UP:
            log.warning("download of %s: given up at %d of %d bytes (%d%%) after %d "
                        "requests: %s", self.release.version, ev.offset, ev.size, pct,
                        ev.attempt, ev.detail or ev.reason)
        elif kind == DONE:
            log.info("download of %s: %d bytes in %d requests, SHA-256 %s",
                     self.release.version, ev.size, ev.attempt, ev.sha256)
        else:
            log.debug("download of %s: %s %d at byte %d%s", self.release.version, kind,
                      ev.attempt, ev.offset, "" if ev.status is None else " (%d)" % ev.status)
        if self.observe is not None:
            self.observe(ev)

    def fetch(self) -> None:
        b, size, sink = self.b, self.release.size, self.sink
        backoff = Backoff(b.retry_first_s, max(b.retry_first_s, b.retry_max_s))
        failures = 0  # failed requests in a row that brought no new byte
        timeout = httpx.Timeout(b.read_timeout_s, connect=b.connect_timeout_s)
        with httpx.Client(verify=_tls(self.ca_file), timeout=timeout, follow_redirects=False,
                          trust_env=False) as client:
            while sink.offset < size:
                if self.stop.is_set():
                    raise _stopped()
                if self.attempt >= b.requests_max:
                    raise DownloadInterrupted("too-many-requests", "%d requests; %d of %d "
                                              "bytes" % (b.requests_max, sink.offset, size))
                self.attempt += 1
                asked = sink.offset
                self.emit(REQUEST)
                try:
                    self._request(client)
                except DownloadInterrupted as e:
                    if sink.offset > asked:  # the link works, it broke: a fresh count
                        failures = 0
                        backoff.reset()
                    failures += 1
                    self._wait_to_retry(e, failures, backoff)

    def _wait_to_retry(self, e: DownloadInterrupted, failures: int, backoff: Backoff) -> None:
        """Sleep before the next request, or raise: the retries or the time ran out."""
        b = self.b
        if failures >= b.attempts_max:
            raise DownloadInterrupted(e.reason, "%s (%d failed requests in a row, the "
                                      "limit)" % (e.message, failures), e.retry_after) from e
        wait = backoff.next()
        if e.retry_after is not None:
            if e.retry_after > b.retry_after_max_s:
                raise DownloadInterrupted(e.reason, "%s; the server asks to wait %.0f s, "
                                          "more than %.0f s" % (e.message, e.retry_after,
                                                                b.retry_after_max_s),
                                          e.retry_after) from e
            wait = max(wait, e.retry_after)
        if self.clock() + wait - self.started > b.deadline_s:
            raise DownloadInterrupted("deadline", "%s; waiting %.1f s more would pass the "
                                      "download's deadline of %.0f s"
                                      % (e, wait, b.deadline_s), e.retry_after) from e
        self.emit(RETRY, reason=e.reason, detail=str(e), wait_s=wait)
        with contextlib.suppress(OSError):
            self.sink.sync()  # a stop during the wait keeps every byte that arrived
        if self.stop.wait(wait):
            raise _stopped() from e

    def _request(self, client: httpx.Client) -> None:
        sink, b = self.sink, self.b
        # identity: the bytes counted and hashed are the artifact's, never a decoding
        headers = {"Accept-Encoding": "identity"}
        if sink.offset:
            headers["Range"] = "bytes=%d-" % sink.offset
        try:
            with client.stream("GET", self.release.url, headers=headers) as resp:
                asked = sink.offset
                end = _start_of_body(resp, sink, self.release.size)
                if asked and not sink.offset:
                    self.emit(RESTART, status=resp.status_code)
                self.emit(RESPONSE, status=resp.status_code)
                self._body(resp, end)
        except httpx.TimeoutException as e:
            raise DownloadInterrupted("slow-retrieval", "no bytes for %.0f s (%s)"
                                      % (b.read_timeout_s, type(e).__name__)) from e
        except httpx.TransportError as e:
            if isinstance(e, httpx.ConnectError) and "CERTIFICATE" in str(e).upper():
                raise DownloadRefused("tls", "the server's certificate is not from the "
                                      "configured CA: %s" % e) from e
            raise DownloadInterrupted("connection", "%s: %s" % (type(e).__name__, e)) from e

    def _body(self, resp: httpx.Response, end: int) -> None:
        sink, b, size = self.sink, self.b, self.release.size
        window_start, window_bytes = self.clock(), 0
        # unchunked: each piece as the network gave it, so a piece that arrived before the
        # link broke is written too (a re-chunking buffer would lose it with the exception)
        for chunk in resp.iter_raw():
            if len(chunk) > end - sink.offset:
                if end == size:
                    raise DownloadRefused("endless-data", "the server sent more than the "
                                          "release's %d bytes" % size)
                raise DownloadRefused("bad-content-range", "the server sent past the end "
                                      "of its Content-Range (byte %d)" % (end - 1))
            sink.write(chunk)
            if self.stop.is_set():
                raise _stopped()
            window_bytes += len(chunk)
            step = _PROGRESS_STEPS * sink.offset // size
            if step > self.logged_step:
                self.logged_step = step
                log.info("download of %s: %d of %d bytes (%d%%)", self.release.version,
                         sink.offset, size, 100 * sink.offset // size)
            now = self.clock()
            if now - self.started > b.deadline_s:
                raise DownloadRefused("slow-retrieval", "the download took longer than %.0f s"
                                      % b.deadline_s)
            if now - window_start >= b.rate_window_s:
                rate = window_bytes / (now - window_start)
                if rate < b.min_rate_bytes_s:
                    raise DownloadRefused("slow-retrieval", "%.0f bytes/s, below the "
                                          "minimum %d bytes/s" % (rate, b.min_rate_bytes_s))
                window_start, window_bytes = now, 0
