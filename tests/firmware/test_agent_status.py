"""The agent's status map is written straight into one buffer (``Agent.status_cbor``), not
built as a dict and encoded by ``cbor.dumps``: the bytes must still be the deterministic
encoding of the map (RFC 8949 §4.2.1), the same bytes ``cbor.dumps`` writes for it, with
every key the fleet reads."""

from __future__ import annotations

from pathlib import Path

import cbor2

from cityedge_core import cbor
from cityedge_fw import VERSION

from support.firmware_agent import DEVICE, make_agent


def test_status_bytes_are_the_deterministic_encoding_of_the_status_map(
        tmp_path: Path) -> None:
    a = make_agent(tmp_path)
    a.last_error = "sampler: a long error message, more than 23 bytes"
    a.state.set(update=["scheduled", "0.2.0", 7, ""])
    a.mem_errors, a.readings_total, a.drops_total = 3, 300, 70000
    raw = bytes(a.status_cbor())
    status = cbor2.loads(raw)
    assert raw == cbor.dumps(status)  # the keys in their deterministic order
    assert sorted(status) == sorted([
        "device", "fw", "board", "boot", "uptime_s", "heap_free", "buffer_batches",
        "buffer_bytes", "buffer_budget", "drops", "sensor_faults", "readings", "seq",
        "mqtt_connects", "mem_errors", "last_error", "update"])
    assert (status["device"], status["fw"], status["boot"], status["mem_errors"],
            status["readings"], status["drops"], status["update"], status["last_error"]) == (
        DEVICE, VERSION, 1, 3, 300, 70000, ["scheduled", "0.2.0", 7, ""],
        "sampler: a long error message, more than 23 bytes")
    a.state.set(update=None)
    a.last_error = None
    status = cbor2.loads(bytes(a.status_cbor()))
    assert (status["update"], status["last_error"]) == (None, "")
