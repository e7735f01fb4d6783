"""The agent's settings: defaults and accepted ranges, checked once at boot.

A boot-only module: ``main.build`` checks the configuration's ``agent`` map here and then
takes this module off the heap (``cityedge_fw.unload``); the running agent keeps only the
checked values and, for settings the fleet may change later (``down/desired``), the
ranges in ``agent.DESIRED``.
"""

from .agent import DESIRED

DEFAULTS = {
    "sample_interval_s": 10,  # seconds between two sensor sweeps
    "batch_readings": 32,  # readings (SenML records) per batch at most
    "batch_seconds": 300,  # seconds: a batch is sealed at least this often
    "status_interval_s": 60,  # seconds between two status messages
    "buffer_budget_bytes": 262144,  # bytes of flash for buffered batches (with headers)
    "time_scale": 1,  # >1: accelerated clock (tests); schedule runs this much faster
    "keepalive_s": 60,  # MQTT keep-alive
    "watchdog_ms": 5000,  # ms between two watchdog feeds
}
LIMITS = {  # accepted range of each setting (those in agent.DESIRED: from there)
    "buffer_budget_bytes": (4096, 1 << 30),
    "time_scale": (1, 100000),
    "keepalive_s": (10, 3600),
    "watchdog_ms": (100, 60000),
}
for _key, _lo, _hi in DESIRED:
    LIMITS[_key] = (_lo, _hi)


def check(settings):
    """Defaults filled in, every value an int within ``LIMITS`` (ValueError otherwise)."""
    out = dict(DEFAULTS)
    for key in settings:
        if key in LIMITS:
            out[key] = settings[key]
    for key in LIMITS:
        lo, hi = LIMITS[key]
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > hi:
            raise ValueError("setting %s=%r must be an integer in %d..%d" % (key, v, lo, hi))
    return out
