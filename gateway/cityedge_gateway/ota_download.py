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
- at most ``OTA_REQUESTS_MAX`` responses per call (a server that ends every response early).

Errors say who is at fault: ``DownloadRefused`` (the server or its data broke a rule; a
retry against the same server will not help without a change there) and
``DownloadInterrupted`` (the transport failed: the link, a 5xx, a read that timed out;
progress kept, call again to resume). Both carry a short ``reason`` word for the status.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from cityedge_host.files import write_atomic

from . import limits
from .ota_release import VerifiedRelease

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d{1,15})-(\d{1,15})/(\d{1,15}|\*)\Z")


@dataclass(frozen=True)
class DownloadLimits:
    connect_timeout_s: float = limits.OTA_CONNECT_TIMEOUT_S
    read_timeout_s: float = limits.OTA_READ_TIMEOUT_S
    deadline_s: float = limits.OTA_DOWNLOAD_DEADLINE_S
    min_rate_bytes_s: int = limits.OTA_MIN_RATE_BYTES_S
    rate_window_s: float = limits.OTA_RATE_WINDOW_S
    sync_every_bytes: int = limits.OTA_SYNC_EVERY_BYTES
    requests_max: int = limits.OTA_REQUESTS_MAX


class DownloadError(Exception):
    """``reason``: one word for the status; the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("%s: %s" % (reason, message))
        self.reason = reason


class DownloadRefused(DownloadError):
    """The server or the data it sent broke a rule."""


class DownloadInterrupted(DownloadError):
    """The transport failed; the progress is kept and a new call resumes."""


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


def _start_of_body(resp: httpx.Response, sink: _Sink, size: int) -> None:
    """Check the response's status and headers against what we asked; place the sink."""
    asked = sink.offset
    code = resp.status_code
    if code >= 500 or code == 429:
        raise DownloadInterrupted("http-status", "the server answered %d" % code)
    if code == 200:
        if asked:
            log.warning("the server ignored Range (asked from byte %d): starting again", asked)
            sink.restart()
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
    else:
        raise DownloadRefused("http-status", "the server answered %d" % code)
    length = resp.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > size - sink.offset):
        raise DownloadRefused("endless-data", "Content-Length %s, but only %d bytes are due"
                              % (length[:20], size - sink.offset))


def download(release: VerifiedRelease, part: Path, *, ca_file: Path,
             bounds: DownloadLimits | None = None,
             clock: Callable[[], float] = time.monotonic) -> Path:
    """Bring ``release``'s artifact into ``part`` (see the module's docstring)."""
    b = bounds or DownloadLimits()
    size = release.size
    part.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        sink = _Sink(release, part, f, b.sync_every_bytes)
        sink.resume()
        try:
            _fetch(release, sink, ca_file, b, clock)
        except DownloadRefused as e:
            if e.reason == "endless-data":
                discard(part)
            else:
                sink.sync()
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                sink.sync()  # what arrived is kept for the next call
            raise
        sink.sync()
        if not hmac.compare_digest(sink.hash.digest(), release.sha256):
            discard(part)
            raise DownloadRefused("hash-mismatch", "the %d bytes do not have the release's "
                                  "SHA-256; the partial file was removed" % size)
    progress_path(part).unlink(missing_ok=True)
    return part


def _fetch(release: VerifiedRelease, sink: _Sink, ca_file: Path, b: DownloadLimits,
           clock: Callable[[], float]) -> None:
    size = release.size
    started = clock()
    timeout = httpx.Timeout(b.read_timeout_s, connect=b.connect_timeout_s)
    with httpx.Client(verify=_tls(ca_file), timeout=timeout, follow_redirects=False,
                      trust_env=False) as client:
        for _ in range(b.requests_max):
            if sink.offset >= size:
                return
            # identity: the bytes counted and hashed are the artifact's, never a decoding
            headers = {"Accept-Encoding": "identity"}
            if sink.offset:
                headers["Range"] = "bytes=%d-" % sink.offset
            try:
                with client.stream("GET", release.url, headers=headers) as resp:
                    _start_of_body(resp, sink, size)
                    _body(resp, sink, size, b, clock, started)
            except httpx.TimeoutException as e:
                raise DownloadInterrupted("slow-retrieval", "no bytes for %.0f s (%s)"
                                          % (b.read_timeout_s, type(e).__name__)) from e
            except httpx.TransportError as e:
                if isinstance(e, httpx.ConnectError) and "CERTIFICATE" in str(e).upper():
                    raise DownloadRefused("tls", "the server's certificate is not from the "
                                          "configured CA: %s" % e) from e
                raise DownloadInterrupted("connection", "%s: %s"
                                          % (type(e).__name__, e)) from e
        if sink.offset < size:
            raise DownloadInterrupted("short-responses", "%d responses ended early; %d of %d "
                                      "bytes" % (b.requests_max, sink.offset, size))


def _body(resp: httpx.Response, sink: _Sink, size: int, b: DownloadLimits,
          clock: Callable[[], float], started: float) -> None:
    window_start, window_bytes = clock(), 0
    # unchunked: each piece as the network gave it, so a piece that arrived before the link
    # broke is written too (a re-chunking buffer would lose it with the exception)
    for chunk in resp.iter_raw():
        if len(chunk) > size - sink.offset:
            raise DownloadRefused("endless-data", "the server sent more than the release's "
                                  "%d bytes" % size)
        sink.write(chunk)
        window_bytes += len(chunk)
        now = clock()
        if now - started > b.deadline_s:
            raise DownloadRefused("slow-retrieval", "the download took longer than %.0f s"
                                  % b.deadline_s)
        if now - window_start >= b.rate_window_s:
            rate = window_bytes / (now - window_start)
            if rate < b.min_rate_bytes_s:
                raise DownloadRefused("slow-retrieval", "%.0f bytes/s, below the minimum "
                                      "%d bytes/s" % (rate, b.min_rate_bytes_s))
            window_start, window_bytes = now, 0
