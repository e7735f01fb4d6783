"""Retry delays: doubling, capped, jittered — the one helper every CPython part uses.

``Backoff(first_s, max_s)`` hands out the wait before each retry: ``first_s``, then twice
the last, never above ``max_s``, each scaled by a random factor in ``[1 - jitter, 1 +
jitter]`` so that many clients that failed together (a broker restart) do not come back
together. ``reset()`` after a success. (The firmware has its own, in integer milliseconds:
``cityedge_fw.backoff.delay_ms``.)
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(self, first_s: float, max_s: float, jitter: float = 0.5,
                 rand: Callable[[], float] = random.random) -> None:
        if not 0 < first_s <= max_s or not 0 <= jitter < 1:
            raise ValueError("0 < first_s <= max_s and 0 <= jitter < 1")
        self.first_s = first_s
        self.max_s = max_s
        self.jitter = jitter
        self._rand = rand
        self.attempts = 0  # retries since the last reset

    def next(self) -> float:
        """Seconds to wait before the next try."""
        base: float = min(self.first_s * 2.0 ** min(self.attempts, 64), self.max_s)
        self.attempts += 1
        return base * (1 - self.jitter + 2 * self.jitter * self._rand())

    def reset(self) -> None:
        self.attempts = 0
