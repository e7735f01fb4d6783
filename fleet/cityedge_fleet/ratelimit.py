"""In-process rate limiters: a token bucket per client address, and the OTA downloads'
budget per device.

One limiter per concern (failed authentications, enrollment attempts). A bucket holds up
to ``burst`` tokens and refills at ``per_s`` tokens per second; each counted attempt takes
one (for logins only failures count: ``auth``). Buckets are keyed by the client address
``auth.client_address`` gives (behind a configured proxy, the forwarded client's).
At most ``max_clients`` addresses are tracked: the least recently seen is forgotten first.
In-process only: with several API workers each enforces its own share (a shared store
such as the database or Redis is the scale path).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucketLimiter:
    def __init__(self, burst: int, per_s: float, max_clients: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or per_s <= 0 or max_clients < 1:
            raise ValueError("burst >= 1, per_s > 0 and max_clients >= 1")
        self.burst = burst
        self.per_s = per_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _level(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.per_s)

    def take(self, client: str) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        with self._lock:
            now = self._clock()
            tokens = self._level(client, now)
            ok = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if ok else tokens, now)
            self._buckets.move_to_end(client)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return ok


@dataclass(frozen=True)
class Throttled:
    """A request the budget refuses now: ``what`` ran out ("requests" or "bytes"), and
    the whole seconds until it admits one again (the 429's ``Retry-After``)."""

    what: str
    retry_after_s: int


class DownloadBudget:
    """Each device's share of the OTA download endpoints (``api/ota_routes``), so that one
    device with a valid download capability cannot take the artifact server from the
    others: two token buckets per device, for requests and for bytes served.

    - requests: ``requests_burst`` at once, refilled at ``requests_per_s``; a request takes
      one token and is refused (not counted) when none is left;
    - bytes: ``bytes_burst``, refilled at ``bytes_per_s``; a response is admitted while the
      bucket is not below zero and takes its whole size, so the bucket may go below zero by
      one response (any range, up to a whole artifact, can always be served once the
      bucket refills: a device is slowed, never locked out) and the next request waits
      until the debt is paid back. Over any time ``t`` a device gets at most
      ``bytes_burst + t * bytes_per_s`` bytes plus one response.

    Keyed by device id (the capability's member, not its address: devices behind one NAT
    keep their own shares). At most ``max_devices`` tracked, the least recently seen
    forgotten first (a forgotten device starts with full buckets: bounded memory over
    exactness). In-process: each API worker enforces its own share.
    """

    def __init__(self, requests_burst: int, requests_per_s: float, bytes_burst: int,
                 bytes_per_s: float, max_devices: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (requests_burst < 1 or requests_per_s <= 0 or bytes_burst < 1 or bytes_per_s <= 0
                or max_devices < 1):
            raise ValueError("bursts >= 1, rates > 0 and max_devices >= 1")
        self.requests_burst = float(requests_burst)
        self.requests_per_s = requests_per_s
        self.bytes_burst = float(bytes_burst)
        self.bytes_per_s = bytes_per_s
        self.max_devices = max_devices
        self._clock = clock
        # device -> (request tokens, byte tokens, when)
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, device: str, nbytes: int) -> Throttled | None:
        """Take one request and ``nbytes`` for ``device``: None (admitted), or why not."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            now = self._clock()
            req, byt, at = self._buckets.get(device, (self.requests_burst, self.bytes_burst,
                                                      now))
            req = min(self.requests_burst, req + (now - at) * self.requests_per_s)
            byt = min(self.bytes_burst, byt + (now - at) * self.bytes_per_s)
            refused: Throttled | None = None
            if req < 1.0 or byt < 0.0:  # Retry-After: until both admit a request again
                wait = max((1.0 - req) / self.requests_per_s, -byt / self.bytes_per_s)
                refused = Throttled("requests" if req < 1.0 else "bytes", _whole(wait))
            else:
                req, byt = req - 1.0, byt - nbytes
            self._buckets[device] = (req, byt, now)
            self._buckets.move_to_end(device)
            while len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
            return refused


def _whole(seconds: float) -> int:
    """Seconds for ``Retry-After``: rounded up, at least 1."""
    return max(1, int(seconds) + (seconds > int(seconds)))
