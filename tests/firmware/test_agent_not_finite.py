"""A sensor value that is not finite (NaN, infinity) is a sensor fault: counted in
``sensor_faults`` and never signed (the fleet refuses a batch holding one as malformed);
the other readings of the sweep are signed as usual. The agent and ring buffer on CPython."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cityedge_core import chain, senml

from support.firmware_agent import Board, fleet_verifier, make_agent
from support.ring_reader import oldest

NAN, INF = float("nan"), float("inf")


class Sensor:
    name = "s"

    def __init__(self) -> None:
        self.values = iter([20.5, NAN, 21.0, INF, -INF, 7])

    def read(self) -> list[tuple[str, str, Any]]:
        return [("t", "Cel", next(self.values)), ("n", "1", 3)]


def test_values_that_are_not_finite_are_sensor_faults(tmp_path: Path) -> None:
    a = make_agent(tmp_path, 8192, Board(lambda: [Sensor()], unix_time=1_790_000_000.0),
                   batch_readings=50)
    taken = sum(a.sweep() for _ in range(6))
    a.seal()
    assert taken == 9 and a.sensor_faults == 3
    (_seq, data), = oldest(a.store, 1)
    verdict = fleet_verifier().check(data)
    assert verdict.status == chain.OK  # the fleet's rules hold: every value finite
    values = [r[senml.V] for r in senml.resolve(verdict.batch.records)]
    assert values == [20.5, 3, 3, 21.0, 3, 3, 3, 7, 3]
