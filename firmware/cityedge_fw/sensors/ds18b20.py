"""Maxim DS18B20 temperature over 1-Wire.

Datasheet: reset + presence pulse; ROM command (0xCC skip ROM for a single part, or
0x55 match ROM + 8-byte ROM code); function 0x44 convert T (750 ms at 12 bits), then
reset + ROM command + 0xBE read scratchpad: 9 bytes, byte 8 is the Dallas CRC-8 of bytes
0-7; temperature = signed 16-bit (byte 1 << 8 | byte 0) / 16 °C, valid -55 to +125 °C.
85.0 °C is the power-on value: read back when a conversion never ran, so it is a fault.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x

from . import SensorFault, sleep_ms

_SKIP_ROM = const(0xCC)
_MATCH_ROM = const(0x55)
_CONVERT_T = const(0x44)
_READ_SCRATCHPAD = const(0xBE)
_CONVERT_MS = const(750)  # ms: 12-bit conversion time
_POWER_ON_RAW = const(0x0550)  # 85.0 °C


def crc8_maxim(data: bytes, end: int = -1) -> int:
    """CRC-8 of Dallas/Maxim 1-Wire parts: polynomial x^8+x^5+x^4+1 (0x8C reflected), init 0."""
    if end < 0:
        end = len(data)
    crc = 0
    for i in range(end):
        byte = data[i]
        for _ in range(8):
            mix = (crc ^ byte) & 0x01
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc


class DS18B20:
    def __init__(self, name: str, ow: object, rom: bytes | None = None, sleep: object = None):
        self.name = name
        self.ow = ow
        self.rom = rom
        self._sleep = sleep or sleep_ms
        self._buf = bytearray(9)
        self._key = name + "/temp"

    def _select(self) -> None:
        if not self.ow.reset():
            raise SensorFault("ds18b20: no presence pulse (missing or wiring)")
        if self.rom is None:
            self.ow.writebyte(_SKIP_ROM)
        else:
            self.ow.writebyte(_MATCH_ROM)
            self.ow.write(self.rom)

    def read(self) -> list:
        try:
            self._select()
            self.ow.writebyte(_CONVERT_T)
            self._sleep(_CONVERT_MS)
            self._select()
            self.ow.writebyte(_READ_SCRATCHPAD)
            self.ow.readinto(self._buf)
        except OSError as e:
            raise SensorFault("ds18b20: bus error (%s)" % e) from None
        buf = self._buf
        if crc8_maxim(buf, 8) != buf[8] or buf == b"\xff" * 9:
            raise SensorFault("ds18b20: scratchpad CRC mismatch")
        raw = (buf[1] << 8) | buf[0]
        if raw == _POWER_ON_RAW:
            raise SensorFault("ds18b20: power-on value 85.0 (conversion did not run)")
        if raw & 0x8000:
            raw -= 0x10000
        t = raw / 16
        if t < -55 or t > 125:
            raise SensorFault("ds18b20: %.2f °C out of range" % t)
        return [(self._key, "Cel", t)]


def wire(board: object, spec: dict) -> DS18B20:
    """The driver for a (validated) configuration entry on ``board`` (``hal.BaseBoard``)."""
    rom = spec.get("rom")
    return DS18B20(spec["name"], board.onewire_bus(spec["pin"]),  # type: ignore[attr-defined]
                   bytes.fromhex(rom) if rom else None)
