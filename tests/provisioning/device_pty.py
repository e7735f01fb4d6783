"""The simulated device of the provisioning tests: ``cityedge_provision.simdevice`` (the
real firmware on the MicroPython unix port, its UART on a pseudo-terminal)."""

from __future__ import annotations

from collections.abc import Callable

from cityedge_provision.simdevice import HEAP, MICROPYTHON, ROOT
from cityedge_provision.simdevice import SimulatedDevice as PtyDevice

__all__ = ["HEAP", "MICROPYTHON", "ROOT", "DeviceFactory", "PtyDevice"]

DeviceFactory = Callable[..., PtyDevice]
