"""Sensor drivers: one small module per part, all behind the same two-member interface.

A sensor object has ``.name`` and ``.read() -> [(senml_name, unit, value), ...]`` (an empty
list when the part has no new value yet). A missing part (no ACK / no presence pulse: an
``OSError`` from the bus) or garbage (CRC mismatch, value out of the datasheet range) raises
``SensorFault(reason)``; the agent reports faults in its status and keeps sampling the rest.

Drivers take a bus object, not pins: ``machine.I2C``-like (``writeto``, ``readfrom_into``),
``onewire.OneWire``-like (``reset``, ``writebyte``, ``write``, ``readinto``) or
``machine.ADC``-like (``read_u16``), so the tests drive them with simulated buses.
"""

try:
    from time import sleep_ms as _sleep_ms
except ImportError:  # CPython
    from time import sleep as _sleep

    def _sleep_ms(ms: int) -> None:
        _sleep(ms / 1000)


class SensorFault(Exception):
    """A sensor is missing or returned garbage; ``reason`` says which. Reported, not fatal."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def crc8_sensirion(data: bytes, start: int = 0, end: int = -1) -> int:
    """CRC-8 of Sensirion parts (SHT3x, SCD4x): polynomial 0x31, init 0xFF, no reflection."""
    if end < 0:
        end = len(data)
    crc = 0xFF
    for i in range(start, end):
        crc ^= data[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def check_words(buf: bytes, words: int, part: str) -> None:
    """Sensirion framing: each 16-bit word is followed by its CRC-8; SensorFault if one is off."""
    for i in range(words):
        j = 3 * i
        if crc8_sensirion(buf, j, j + 2) != buf[j + 2]:
            raise SensorFault("%s: CRC mismatch in word %d" % (part, i))


def sleep_ms(ms: int) -> None:
    _sleep_ms(ms)
