"""Fixtures for the core tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import compile_core


@pytest.fixture(scope="session")
def core_mpy(tmp_path_factory: pytest.TempPathFactory, mpy_cross: str) -> Path:
    """The core compiled to .mpy, as a device would run it."""
    return compile_core(tmp_path_factory.mktemp("mpy"))
