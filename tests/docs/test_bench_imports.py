"""``make bench`` is not run by ``make test`` (it measures, for minutes); its modules are
at least imported here, so a move elsewhere in the tree cannot break it unseen (the
layers move left ``bench.core`` importing a module from where it no longer was)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_bench_module_imports(name: str) -> None:
    importlib.import_module("bench" if name == "__init__" else "bench." + name)
