"""What the command tests share: the device's own gate as a device holds it (the real
``cityedge_core.command_gate.CommandGate`` on CPython, trusting the keys enrollment handed it),
with its state in memory."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cityedge_core import cose, p256
from cityedge_core.command_gate import CommandGate


class MemState:
    """The gate's ``State`` (``cmd_seq``) in memory."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, **kv: Any) -> None:
        self.values.update(kv)


def device_gate(device: str, fleet_keys: list[str], now: float | None = None) -> CommandGate:
    """The device's gate, trusting ``fleet_keys`` (SEC1 hex, as ``EnrollResponse`` carries
    them) as p256 keys, the device's own primitive; the clock is now unless ``now``."""
    keys = {cose.kid_for_public_key(bytes.fromhex(k)): p256.PublicKey.from_sec1(
        bytes.fromhex(k)) for k in fleet_keys}
    clock = (lambda: now) if now is not None else (
        lambda: int(dt.datetime.now(dt.UTC).timestamp()))
    return CommandGate(device, keys, MemState(), clock)
