"""Sensirion SCD40/SCD41 CO2 (with temperature and humidity) over I2C, periodic mode.

Datasheet: 0x21B1 starts periodic measurement (a new value every 5 s); 0xE4B8
get_data_ready_status returns one word, data is ready when its low 11 bits are not 0;
0xEC05 read_measurement returns three words (CO2 ppm, T, RH), each followed by a CRC-8
(0x31/0xFF); the part needs 1 ms after each command before the read.
T = -45 + 175 * raw / 65535 °C, RH = 100 * raw / 65535 %. CO2 outside 0-40000 ppm is garbage.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x

from . import SensorFault, check_words, sleep_ms

ADDRESS = 0x62
_START_PERIODIC = b"\x21\xb1"
_DATA_READY = b"\xe4\xb8"
_READ_MEASUREMENT = b"\xec\x05"
_COMMAND_MS = const(1)  # ms between a command and reading its answer
_CO2_MAX = 40000  # ppm: top of the measurement range


class SCD4x:
    def __init__(self, name: str, i2c: object, address: int = ADDRESS, sleep: object = None):
        self.name = name
        self.i2c = i2c
        self.address = address
        self._sleep = sleep or sleep_ms
        self._buf = bytearray(9)
        self._ready = bytearray(3)
        self._started = False
        self._names = (name + "/co2", name + "/temp", name + "/humidity")

    def _command(self, cmd: bytes, answer: bytearray | None) -> None:
        self.i2c.writeto(self.address, cmd)
        self._sleep(_COMMAND_MS)
        if answer is not None:
            self.i2c.readfrom_into(self.address, answer)

    def read(self) -> list:
        """The latest measurement, or ``[]`` while the part has none ready (every 5 s)."""
        try:
            if not self._started:
                self._command(_START_PERIODIC, None)
                self._started = True
            self._command(_DATA_READY, self._ready)
            check_words(self._ready, 1, "scd4x")
            if ((self._ready[0] << 8) | self._ready[1]) & 0x07FF == 0:
                return []
            self._command(_READ_MEASUREMENT, self._buf)
        except OSError as e:
            self._started = False  # a power-cycled part must be started again
            raise SensorFault("scd4x@0x%02x: no answer (%s)" % (self.address, e)) from None
        buf = self._buf
        check_words(buf, 3, "scd4x")
        co2 = (buf[0] << 8) | buf[1]
        if co2 > _CO2_MAX:
            raise SensorFault("scd4x: CO2 %d ppm out of range" % co2)
        t = -45 + 175 * ((buf[3] << 8) | buf[4]) / 65535
        rh = 100 * ((buf[6] << 8) | buf[7]) / 65535
        return [
            (self._names[0], "ppm", co2),
            (self._names[1], "Cel", round(t, 2)),
            (self._names[2], "%RH", round(rh, 2)),
        ]


def wire(board: object, spec: dict) -> SCD4x:
    """The driver for a (validated) configuration entry on ``board`` (``hal.BaseBoard``)."""
    return SCD4x(spec["name"], board.i2c_bus(spec),  # type: ignore[attr-defined]
                 spec.get("address", ADDRESS))
