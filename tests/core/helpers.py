"""Small helpers for the core tests: records, keys and a MicroPython runner."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from cityedge_core import senml

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "urn:dev:mac:0024befffe804ff1"


def records(n: int, t0: int = 1_700_000_000) -> list[dict[int, Any]]:
    """A typical 50-reading pack: base name/time on the first record, then n, t, v."""
    out: list[dict[int, Any]] = [
        {senml.BN: DEVICE + ":", senml.BT: t0, senml.N: "temp", senml.U: "Cel", senml.V: 21.5}
    ]
    for i in range(1, n):
        out.append({senml.N: ("temp", "rh", "pm25")[i % 3], senml.T: i, senml.V: 20 + i / 8})
    return out


def run_micropython(script: str, heap: str = "4m", core_dir: Path | None = None,
                    timeout: float = 120) -> str:
    """Run ``script`` on the MicroPython unix port with the core importable; return stdout.

    A compiled core (``core_dir``) is loaded from the working directory, by relative
    paths: every module's path is interned into the heap as its ``__file__``, so a core
    under pytest's temporary directory (longer under xdist, ``popen-gw0/``) gave a heap
    laid out differently on every machine and worker, and a program near its heap's
    limit passed or failed with the path's length (docs/ARCHITECTURE.md, "Memory on the
    device"). The source tree (no ``core_dir``) keeps ``cwd`` at the project root."""
    mp = ROOT / ".venv" / "bin" / "micropython"
    path = "" if core_dir else str(ROOT / "firmware")
    prog = "import sys\nsys.path.insert(0, %r)\n%s" % (path, script)
    res = subprocess.run([str(mp), "-X", "heapsize=" + heap, "-c", prog],
                         capture_output=True, text=True, timeout=timeout,
                         cwd=core_dir or ROOT)
    if res.returncode != 0:
        raise AssertionError("micropython failed (%d): %s %s" % (res.returncode, res.stdout,
                                                                 res.stderr))
    return res.stdout


def compile_core(dest: Path) -> Path:
    """Compile ``firmware/cityedge_core`` to .mpy under ``dest`` (what a device runs)."""
    from cityedge_host.mpy import compile_core as _compile

    return _compile(dest)
