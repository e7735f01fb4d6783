"""Stopping a process a test started: ask, wait, then insist."""

from __future__ import annotations

import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], wait_s: float = 10.0) -> None:
    """SIGTERM, up to ``wait_s`` seconds to exit, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
