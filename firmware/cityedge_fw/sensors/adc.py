"""An analogue channel (``machine.ADC.read_u16``) scaled linearly to a unit.

value = offset + scale * raw / 65535, e.g. a 4-20 mA loop across a shunt, a noise level
meter's DC output, a soil-moisture probe. Values outside [low, high] are a fault (a broken
wire reads as a rail).
"""

from . import SensorFault


class ADCChannel:
    def __init__(
        self,
        name: str,
        adc: object,
        unit: str,
        scale: float = 1.0,
        offset: float = 0.0,
        low: float | None = None,
        high: float | None = None,
    ):
        self.name = name
        self.adc = adc
        self.unit = unit
        self.scale = scale
        self.offset = offset
        self.low = low
        self.high = high

    def read(self) -> list:
        try:
            raw = self.adc.read_u16()
        except OSError as e:
            raise SensorFault("adc %s: read failed (%s)" % (self.name, e)) from None
        value = self.offset + self.scale * raw / 65535
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise SensorFault("adc %s: %.3f %s out of range" % (self.name, value, self.unit))
        return [(self.name, self.unit, round(value, 3))]


def wire(board: object, spec: dict) -> ADCChannel:
    """The driver for a (validated) configuration entry on ``board`` (``hal.BaseBoard``)."""
    return ADCChannel(spec["name"], board.adc(spec["pin"]),  # type: ignore[attr-defined]
                      spec["unit"], spec.get("scale", 1.0), spec.get("offset", 0.0),
                      spec.get("low"), spec.get("high"))
