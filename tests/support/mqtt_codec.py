"""Test-side helpers for the device's MQTT codec (``cityedge_fw.mqtt``).

The device module keeps only what the device runs: every function of a module the board
loads costs heap there (a function object each, its names interned), so what only the tests
use lives here: a whole PUBLISH as one ``bytes`` and the client's queue joined.
"""

from __future__ import annotations

from typing import Any

from cityedge_fw import mqtt


def encode_publish(topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                   packet_id: int = 0, dup: bool = False) -> bytes:
    """PUBLISH (§3.3): the device's header (``mqtt.publish_header``), then the payload."""
    return mqtt.publish_header(topic, len(payload), qos, retain, packet_id,
                               dup) + bytes(payload)


def sent(client: Any) -> bytes:
    """Take the bytes ``client`` queued for the broker, joined (may be empty)."""
    return b"".join(client.chunks_to_send())
