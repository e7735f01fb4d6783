"""A serial value that is not finite (NaN, or infinity from a Modbus scale that overflows)
is a fault of its input, counted in its stats (status and /metrics), and never becomes a
record the gateway signs: the fleet would refuse the whole batch as malformed."""

from __future__ import annotations

from cityedge_core import senml
from cityedge_gateway import modbus
from cityedge_gateway.config import SerialConfig, SlaveConfig
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


def test_a_float_register_reading_nan_or_infinity_is_counted_and_never_signed() -> None:
    """A meter's f32 register holding NaN (a fault, or a device on the bus that wants the
    gateway's batch refused) is counted against its slave and left out."""
    got: list[Reading] = []
    regs = (Register("voltage", 0, "V", type="f32", table="input"),
            Register("power", 2, "W", type="f32", order="CDAB", table="input"))
    cfg = SerialConfig("bus", "/dev/null", "modbus", 9600,
                       slaves=(SlaveConfig("meter", 1, regs),))
    inp = SerialInput(cfg, lambda readings, t: got.extend(readings), clock=lambda: 1.7e9)
    for voltage, power in ((float("nan"), 1207.5), (230.1, float("-inf"))):
        words = modbus.encode_value("f32", "ABCD", voltage) + modbus.encode_value(
            "f32", "CDAB", power)
        inp._active = inp.pollers[0]
        inp.pollers[0].request(0.0)
        inp._on_bytes(modbus.read_response(1, modbus.FN_READ_INPUT, words))
    assert [(r.name, r.value) for r in got] == [("bus/meter/power", 1207.5),
                                                ("bus/meter/voltage", 230.1)]
    assert inp.stats.errors == {"not_finite": 2}
    assert inp.stats.slaves["meter"].errors == {"not_finite": 2}
    assert inp.stats.slaves["meter"].readings == 2
    senml.validate_pack([r.to_senml(1.7e9) for r in got])
