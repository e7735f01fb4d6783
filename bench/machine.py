"""Describe the machine a benchmark ran on, and take medians."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable


def describe() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 - tiny read
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "%s, %d cores, %s, Python %s" % (model, os.cpu_count() or 0, platform.system(),
                                            platform.python_version())


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


def p50_p99(times: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile (nearest rank) of ``times``."""
    times = sorted(times)
    return times[len(times) // 2], times[max(0, int(len(times) * 0.99) - 1)]
