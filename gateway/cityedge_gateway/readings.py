"""What the serial protocol parsers return: a ``Reading`` or a ``FrameError``.

Both are plain values so a parser stays sans-IO: it is fed bytes and returns a list of
events; the caller (``serial_input``) counts errors and batches readings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cityedge_core import senml


@dataclass(frozen=True)
class Reading:
    """One measured value: SenML name (relative to the gateway), unit, value."""

    name: str
    unit: str
    value: float

    def to_senml(self, time: float) -> dict[int, Any]:
        """The SenML CBOR record for this reading, taken at UNIX ``time``."""
        return {senml.N: self.name, senml.U: self.unit, senml.V: self.value, senml.T: time}


@dataclass(frozen=True)
class FrameError:
    """Bytes that did not make a valid frame. ``kind`` is a short counter label."""

    kind: str  # "checksum", "garbage", "exception", "timeout", "unexpected"
    detail: str
    discarded: int = 0  # bytes thrown away


Event = Reading | FrameError
