"""A sensor value that is not finite (NaN, infinity) is a sensor fault: counted in
``sensor_faults`` and never signed (the fleet refuses a batch holding one as malformed);
the other readings of the sweep are signed as usual. The agent and ring buffer on CPython."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cityedge_core import chain, cose, p256, senml
from cityedge_fw import agent as agentmod
from cityedge_fw import settings, store

DEVICE = "urn:dev:mac:0024befffe804ff1"
KEY = p256.PrivateKey(0xC0FFEE)
KID = cose.kid_for_public_key(KEY.public_key().to_sec1())
NAN, INF = float("nan"), float("inf")


class Sensor:
    name = "s"

    def __init__(self) -> None:
        self.values = iter([20.5, NAN, 21.0, INF, -INF, 7])

    def read(self) -> list[tuple[str, str, Any]]:
        return [("t", "Cel", next(self.values)), ("n", "1", 3)]


class Board:
    name = "test"

    def unix_time(self) -> float:
        return 1_790_000_000.0

    def free_heap(self) -> int:
        return 0

    def wdt_feed(self) -> None:
        pass

    def sensors(self, cfg: Any) -> list[Sensor]:
        return [Sensor()]


def test_values_that_are_not_finite_are_sensor_faults(tmp_path: Path) -> None:
    a = agentmod.Agent(Board(), DEVICE, KEY, KID, store.RingBuffer(str(tmp_path / "buf"), 8192),
                       store.State(str(tmp_path / "state.cbor")),
                       settings.check({"batch_readings": 50}), "127.0.0.1", 1)
    taken = sum(a.sweep() for _ in range(6))
    a.seal()
    assert taken == 9 and a.sensor_faults == 3
    verifier = chain.BatchVerifier({KID: chain.KeyEntry(DEVICE, KEY.public_key())})
    (_seq, data), = a.store.oldest(1)
    verdict = verifier.check(data)
    assert verdict.status == chain.OK  # the fleet's rules hold: every value finite
    values = [r[senml.V] for r in senml.resolve(verdict.batch.records)]
    assert values == [20.5, 3, 3, 21.0, 3, 3, 3, 7, 3]
