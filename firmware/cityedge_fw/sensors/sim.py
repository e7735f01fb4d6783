"""Simulated sensor parts and buses that speak each datasheet's protocol (unix board, tests).

The unix board wires these in place of real buses so the real drivers run unchanged on the
MicroPython unix port; the bus-level tests use them to check each driver against the
datasheet: commands, CRCs, conversion delays (an early read is NACKed), and two failure
modes per part: ``garbage`` (a flipped bit in every answer) and ``missing`` (no ACK /
no presence pulse: ``OSError(ENODEV)`` like ``machine.I2C``). Not frozen into board images.

This module holds the I2C bus and the SHT3x, what the unix board needs for its usual air
sensor; the other parts are modules of their own (``sim_scd4x``, ``sim_onewire`` with the
DS18B20, ``sim_adc``), loaded only for a sensor that uses them: every class and name of a
module the unix board loads stays on the heap (``docs/ARCHITECTURE.md``, "Memory on the
device"). A part's ``clock`` is a function that returns milliseconds: the unix board's is
``time.ticks_ms``; the tests' ``simbus.SimClock`` moves only when a driver sleeps.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


_EIO = const(5)
_ENODEV = const(19)


def _crc8_sensirion(data):
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _words(*values):
    """Sensirion framing: 16-bit big-endian words, each followed by its CRC-8."""
    out = bytearray()
    for v in values:
        w = bytes(((v >> 8) & 0xFF, v & 0xFF))
        out += w + bytes((_crc8_sensirion(w),))
    return bytes(out)


class SimDevice:
    """Base: ``mode`` is ``"ok"``, ``"garbage"`` (a flipped bit in every answer) or
    ``"missing"`` (the part does not ACK its address)."""

    def __init__(self, clock):
        self.clock = clock
        self.mode = "ok"

    def _answer(self, data):
        if self.mode == "garbage":
            data = bytearray(data)
            data[1] ^= 0x04
            data = bytes(data)
        return data


class I2CBus:
    """``machine.I2C``-like, the two calls the drivers make: ``writeto``,
    ``readfrom_into``."""

    def __init__(self, clock):
        self.clock = clock
        self.devices = {}

    def attach(self, address, device):
        self.devices[address] = device
        return device

    def _device(self, address):
        dev = self.devices.get(address)
        if dev is None or dev.mode == "missing":
            raise OSError(_ENODEV)  # what machine.I2C raises on a NACKed address
        return dev

    def writeto(self, address, buf, stop=True):
        self._device(address).write(bytes(buf))
        return len(buf)

    def readfrom_into(self, address, buf, stop=True):
        data = self._device(address).read(len(buf))
        buf[:] = data


class SHT3xDevice(SimDevice):
    """SHT3x: single-shot 0x2400 (15.5 ms), NACKs a read before the conversion is done."""

    def __init__(self, clock, temp=21.5, humidity=45.0):
        super().__init__(clock)
        self.temp = temp
        self.humidity = humidity
        self.ready_at = None
        self.last_command = None  # the last only: the unix board writes one every sweep

    def write(self, data):
        self.last_command = data
        if data == b"\x24\x00":
            self.ready_at = self.clock() + 15
        elif data == b"\x30\xa2":  # soft reset
            self.ready_at = None
        else:
            raise OSError(_EIO)  # unknown command: NACK

    def read(self, n):
        if self.ready_at is None or self.clock() < self.ready_at:
            raise OSError(_ENODEV)  # no measurement ready: NACK
        self.ready_at = None
        t = round((self.temp + 45) * 65535 / 175)
        rh = round(self.humidity * 65535 / 100)
        return self._answer(_words(t, rh))[:n]
