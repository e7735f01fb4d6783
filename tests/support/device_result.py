"""What the firmware tests' device (``tests/firmware/mp_device.py``) prints, read on the host:
its ``RESULT`` line (a JSON list, named here: a map's keys would be interned names on the
heap the device is measured in) and its ``micropython.qstr_info()`` lines."""

from __future__ import annotations

import json
import re
from typing import Any

# What ``mp_device`` reports, in its order (a list: names would cost the device's heap).
RESULT_KEYS = (
    "batches", "published", "seq", "stored", "readings", "drops", "faults", "connects",
    "fed", "min_free", "free_end", "alloc_end", "last_error", "link_error", "alloc",
    "max_alloc", "marks", "boot_alloc", "sim_s", "boot", "commands", "mem_errors",
    "pending", "batch_readings", "heap")
# what held when the stop condition was met (these replace the figures at exit)
AT_STOP_KEYS = ("batches", "seq", "stored", "published", "readings", "pending")


def result(out: str) -> dict[str, Any] | None:
    """The last ``RESULT`` line of a device's output as a map, or None if it has none."""
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return None
    values = json.loads(lines[-1][7:])
    found = dict(zip(RESULT_KEYS, values[:-1], strict=True))
    if values[-1] is not None:
        found.update(zip(AT_STOP_KEYS, values[-1], strict=True))
    return found


def qstr_pools(out: str) -> list[tuple[int, int]]:
    """``(pools, names)`` of each ``micropython.qstr_info()`` line in a device's output
    (``mp_device`` prints one after boot and one at the end)."""
    found = re.findall(r"qstr pool: n_pool=(\d+), n_qstr=(\d+)", out)
    assert found, out
    return [(int(p), int(n)) for p, n in found]
