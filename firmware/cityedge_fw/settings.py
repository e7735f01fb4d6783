"""The agent's settings: defaults and accepted ranges, checked once at boot.

A boot-only module: ``config.check_agent`` checks the configuration's ``agent`` map here
and ``main.build`` then takes this module off the heap (``cityedge_fw.unload``); the
running agent keeps only the checked values and ``DESIRED`` (imported from here: the
tuple outlives the module). It imports nothing of the agent, so checking a configuration
(a HAL test, provisioning) never loads the agent's modules.
"""

# Settings the fleet may change at run time (``down/desired``), with their accepted ranges
# (the agent applies them: ``Agent.apply_desired``).
DESIRED = (
    ("sample_interval_s", 1, 86400),
    ("batch_readings", 1, 200),
    ("batch_seconds", 1, 86400),
    ("status_interval_s", 5, 86400),
)

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
LIMITS = {  # accepted range of each setting (those in DESIRED: from there)
    "buffer_budget_bytes": (4096, 1 << 30),
    "time_scale": (1, 100000),
    "keepalive_s": (10, 3600),
    "watchdog_ms": (100, 60000),
}
LIMITS.update({k: (lo, hi) for k, lo, hi in DESIRED})  # no loop names at module level


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
