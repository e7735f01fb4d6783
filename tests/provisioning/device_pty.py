"""The simulated device of the provisioning tests: ``cityedge_provision.simdevice`` (the
real firmware on the MicroPython unix port, its UART on a pseudo-terminal)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cityedge_provision.simdevice import HEAP, MICROPYTHON, ROOT
from cityedge_provision.simdevice import SimulatedDevice as PtyDevice

from support.device_result import result

__all__ = ["HEAP", "MICROPYTHON", "ROOT", "DeviceFactory", "PtyDevice", "boot_agent"]

DeviceFactory = Callable[..., PtyDevice]


AGENT = """
import sys
sys.path.insert(0, %r)
sys.path.insert(0, %r)
import mp_device
"""


def boot_agent(cfg: dict[str, Any], fw_mpy: Path, tmp: Path, batches: int = 2
               ) -> dict[str, Any]:
    """Boot the agent from a provisioned device's ``cfg`` (its config.json) with the test
    firmware's stand-in board until ``batches`` are signed and acknowledged; returns the
    device's RESULT line."""
    cfg = dict(cfg, stop={"batches": batches}, clock=False,
               agent={"sample_interval_s": 1, "batch_readings": 4, "time_scale": 20,
                      "status_interval_s": 5})
    boot = tmp / "boot.json"
    boot.write_text(json.dumps(cfg))
    tests_fw = Path(__file__).resolve().parents[1] / "firmware"
    proc = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=256k", "-c", AGENT % (str(fw_mpy), str(tests_fw))],
        env={"CE_CONFIG": str(boot), "PATH": os.environ.get("PATH", "")},
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = result(proc.stdout)
    assert found is not None, proc.stdout + proc.stderr
    return found
