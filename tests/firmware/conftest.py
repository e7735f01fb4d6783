"""Fixtures shared by the firmware tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from fw_harness import compile_device


@pytest.fixture(scope="module")
def mpy_dir(tmp_path_factory: pytest.TempPathFactory, micropython: str, mpy_cross: str) -> Path:
    """The firmware compiled to .mpy, with the test device's stand-in board."""
    return compile_device(tmp_path_factory.mktemp("mpy"))
