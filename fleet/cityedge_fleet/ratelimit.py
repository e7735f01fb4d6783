"""An in-process token-bucket rate limiter per client address.

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
