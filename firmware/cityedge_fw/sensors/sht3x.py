"""Sensirion SHT3x (SHT30/31/35) temperature and humidity over I2C, single-shot mode.

Datasheet: command 0x2400 starts a high-repeatability measurement without clock stretching;
it takes up to 15.5 ms, the part NACKs a read before that. The read returns 6 bytes:
T msb, T lsb, CRC, RH msb, RH lsb, CRC (CRC-8 0x31/0xFF). T = -45 + 175 * raw / 65535 °C,
RH = 100 * raw / 65535 %.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x

from . import SensorFault, check_words, sleep_ms

ADDRESS = 0x44  # ADDR pin low; 0x45 when high
_MEASURE_HIGH = const(b"\x24\x00")
_MEASURE_MS = const(16)  # ms: maximum duration at high repeatability (15.5) rounded up


class SHT3x:
    def __init__(self, name: str, i2c: object, address: int = ADDRESS, sleep: object = None):
        self.name = name
        self.i2c = i2c
        self.address = address
        self._sleep = sleep or sleep_ms
        self._buf = bytearray(6)
        self._names = (name + "/temp", name + "/humidity")

    def read(self) -> list:
        try:
            self.i2c.writeto(self.address, _MEASURE_HIGH)
            self._sleep(_MEASURE_MS)
            self.i2c.readfrom_into(self.address, self._buf)
        except OSError as e:
            raise SensorFault("sht3x@0x%02x: no answer (%s)" % (self.address, e)) from None
        buf = self._buf
        check_words(buf, 2, "sht3x")
        t = -45 + 175 * ((buf[0] << 8) | buf[1]) / 65535
        rh = 100 * ((buf[3] << 8) | buf[4]) / 65535
        return [(self._names[0], "Cel", round(t, 2)), (self._names[1], "%RH", round(rh, 2))]


def wire(board: object, spec: dict) -> SHT3x:
    """The driver for a (validated) configuration entry on ``board`` (``hal.BaseBoard``)."""
    return SHT3x(spec["name"], board.i2c_bus(spec),  # type: ignore[attr-defined]
                 spec.get("address", ADDRESS))
