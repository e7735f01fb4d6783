"""The device's one retry delay: doubling, capped, jittered (the MQTT link, enrollment).

``delay_ms(attempt, first_ms, max_ms)``: before retry ``attempt`` (0-based) wait
``first_ms`` doubled ``attempt`` times, at most ``max_ms``, scaled by a random 50-100 %
(``os.urandom``): devices that failed together (a broker or fleet restart) do not come
back together. Integer milliseconds, no float: the callers' clocks are ``ticks_ms``.
A function, not a class (a class costs a device ~300 bytes of heap); the CPython parts
have theirs in ``cityedge_host.backoff``.
"""

import os

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


_DOUBLINGS = const(24)  # the shift never grows past this: max_ms caps long before


def delay_ms(attempt, first_ms, max_ms):
    """Milliseconds to wait before retry ``attempt`` (0-based): in ``[top/2, top]`` where
    ``top = min(first_ms * 2**attempt, max_ms)``."""
    top = first_ms << min(attempt, _DOUBLINGS)
    if top > max_ms:
        top = max_ms
    half = top // 2
    return half + (top - half) * os.urandom(1)[0] // 255
