"""A serial value that is not finite (NaN, or infinity from a Modbus scale that overflows)
is a fault of its input, counted in its stats (status and /metrics), and never becomes a
record the gateway signs: the fleet would refuse the whole batch as malformed."""

from __future__ import annotations

from cityedge_core import senml
from cityedge_gateway import modbus
from cityedge_gateway.config import SerialConfig
from cityedge_gateway.modbus import Register
from cityedge_gateway.readings import Reading
from cityedge_gateway.serial_input import SerialInput

REGS = (Register("temp", 0, "Cel", type="s16", scale=0.1),
        Register("huge", 1, "W", scale=1e308))  # any raw value above 1 overflows


def test_values_that_are_not_finite_are_counted_and_never_signed() -> None:
    got: list[Reading] = []
    cfg = SerialConfig("env", "/dev/null", "modbus", 9600, unit=7, registers=REGS)
    inp = SerialInput(cfg, lambda readings, t: got.extend(readings), clock=lambda: 1.7e9)
    inp.pollers[0].request(0.0)
    inp._on_bytes(modbus.read_holding_response(7, [215, 3]))  # 21.5 Cel, 3e308 W
    inp._handle([Reading("env/x", "Cel", float("nan")), Reading("env/y", "Cel", -1e400)])
    assert [(r.name, r.value) for r in got] == [("env/temp", 21.5)]
    assert inp.stats.errors == {"not_finite": 3} and inp.stats.readings == 1
    senml.validate_pack([r.to_senml(1.7e9) for r in got])  # what the fleet will accept
