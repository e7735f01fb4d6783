"""Compiled firmware trees built once per test run, keyed by what they are built from.

Each firmware test module compiles the firmware to ``.mpy`` for its devices (71 modules,
one ``mpy-cross`` process each: 3 s on a quiet machine, 11 s on a busy one). The output
depends only on the sources, the build code and the ``mpy-cross`` binary, so the first
module of a run builds the tree into a cache directory named by a SHA-256 of those, and
every module copies it into its own directory (a module may still write beside its tree,
as ``fw_harness.romfs_image`` does). The cache lives in the run's base temporary
directory (shared by the xdist workers of one run, gone with it): a source edited
between runs is a new key, never a stale tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _digest(name: str, inputs: Iterable[Path], tool: str) -> str:
    h = hashlib.sha256(name.encode() + b"\0")
    st = os.stat(tool)
    h.update(("%s %d %d\0" % (tool, st.st_size, st.st_mtime_ns)).encode())
    for path in sorted(set(inputs)):
        h.update(str(path).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _cache_root(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory: each worker's basetemp is under it
    root = base / "mpy-cache"
    root.mkdir(exist_ok=True)
    return root


def firmware_inputs(*extra: Path) -> list[Path]:
    """What a compiled firmware tree is made from: the firmware's sources, the build code
    (module names, compiler options) and ``extra`` files compiled into it."""
    return [*sorted((ROOT / "firmware").rglob("*.py")), ROOT / "cityedge" / "build_firmware.py",
            ROOT / "host" / "cityedge_host" / "mpy.py", *extra]


def cached_tree(factory: pytest.TempPathFactory, name: str, inputs: Iterable[Path],
                tool: str, build: Callable[[Path], object], dest: Path) -> Path:
    """``dest`` filled with what ``build(dir)`` writes into an empty ``dir``, built once
    per run and per content of ``inputs`` and of the compiler ``tool``; returns ``dest``."""
    cache = _cache_root(factory)
    done = cache / ("%s-%s" % (name, _digest(name, inputs, tool)[:20]))
    if not done.is_dir():
        work = Path(tempfile.mkdtemp(prefix=done.name + ".", dir=cache))
        work.chmod(0o755)  # as a directory made by the build itself
        build(work)
        try:
            os.rename(work, done)  # whole or not at all
        except OSError:  # another worker's build got there first (the same bytes)
            shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(done, dest, dirs_exist_ok=True)
    return dest
