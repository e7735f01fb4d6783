"""Fixtures for the provisioning tests: the firmware as .mpy, devices on pseudo-terminals."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityedge_provision import simdevice

sys.path.insert(0, str(Path(__file__).parent))

from device_pty import DeviceFactory, PtyDevice
from fleet_server import FleetServer

from support import mpy_cache
from support.mosquitto import Mosquitto, TestPKI


@pytest.fixture(scope="session")
def fw_mpy(tmp_path_factory: pytest.TempPathFactory, mpy_cross: str, micropython: str) -> Path:
    """The core and the device firmware compiled to .mpy (what a board runs): a copy of
    the run's one build of the same sources (``support.mpy_cache``)."""
    return mpy_cache.cached_tree(
        tmp_path_factory, "simdevice", mpy_cache.firmware_inputs(Path(simdevice.__file__)),
        mpy_cross, simdevice.compile_firmware, tmp_path_factory.mktemp("fw-mpy"))


@pytest.fixture
def make_device(fw_mpy: Path, tmp_path: Path) -> Iterator[DeviceFactory]:
    """Start devices (``make_device(serial, urn, root=..., claim=...)``: ``claim`` is the
    vendor's claim secret in its flash); all are stopped afterwards."""
    started: list[PtyDevice] = []

    def make(serial: str = "SN-00001", device: str = "urn:dev:mac:0024befffe800001",
             root: Path | None = None, claim: str | None = None) -> PtyDevice:
        dev = PtyDevice(root or tmp_path / ("dev-" + serial), fw_mpy, serial, device,
                        claim=claim).start()
        started.append(dev)
        return dev

    yield make
    for dev in started:
        dev.stop()


@pytest.fixture
def fleet(tmp_path: Path, pki: TestPKI, mosquitto: Mosquitto) -> Iterator[FleetServer]:
    """The real fleet service (SQLite), its CA trusted by the test broker."""
    server = FleetServer(tmp_path / "fleet", pki, mosquitto.port).start()
    yield server
    server.stop()
