"""Simulated sensor parts and buses that speak each datasheet's protocol (unix board, tests).

The unix board wires these in place of real buses so the real drivers run unchanged on the
MicroPython unix port; the bus-level tests use them to check each driver against the
datasheet: commands, CRCs, conversion delays (an early read is NACKed), and two failure
modes per part: ``garbage`` (a flipped bit in every answer) and ``missing`` (no ACK /
no presence pulse: ``OSError(ENODEV)`` like ``machine.I2C``). Not frozen into board images.

``SimClock`` is milliseconds that pass only when a driver sleeps (tests); ``TicksClock``
follows the real monotonic clock (the unix board).
"""

_EIO = 5
_ENODEV = 19


def _crc8_sensirion(data):
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc8_maxim(data):
    crc = 0
    for b in data:
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


def _words(*values):
    """Sensirion framing: 16-bit big-endian words, each followed by its CRC-8."""
    out = bytearray()
    for v in values:
        w = bytes(((v >> 8) & 0xFF, v & 0xFF))
        out += w + bytes((_crc8_sensirion(w),))
    return bytes(out)


class SimClock:
    """Milliseconds that pass only when a driver sleeps (the drivers' ``sleep`` argument)."""

    def __init__(self):
        self.ms = 0

    def sleep_ms(self, ms):
        self.ms += ms


class TicksClock:
    """The real monotonic clock (``time.ticks_ms``; ``time.monotonic`` on CPython)."""

    @property
    def ms(self):
        import time

        ticks = getattr(time, "ticks_ms", None)
        return ticks() if ticks else int(time.monotonic() * 1000)

    def sleep_ms(self, ms):
        from . import sleep_ms

        sleep_ms(ms)


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
    """``machine.I2C``-like: ``writeto``, ``readfrom``, ``readfrom_into``, ``scan``."""

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

    def scan(self):
        return [a for a in sorted(self.devices) if self.devices[a].mode != "missing"]

    def writeto(self, address, buf, stop=True):
        self._device(address).write(bytes(buf))
        return len(buf)

    def readfrom(self, address, n, stop=True):
        return self._device(address).read(n)

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
        self.commands = []

    def write(self, data):
        self.commands.append(data)
        if data == b"\x24\x00":
            self.ready_at = self.clock.ms + 15
        elif data == b"\x30\xa2":  # soft reset
            self.ready_at = None
        else:
            raise OSError(_EIO)  # unknown command: NACK

    def read(self, n):
        if self.ready_at is None or self.clock.ms < self.ready_at:
            raise OSError(_ENODEV)  # no measurement ready: NACK
        self.ready_at = None
        t = round((self.temp + 45) * 65535 / 175)
        rh = round(self.humidity * 65535 / 100)
        return self._answer(_words(t, rh))[:n]


class SCD4xDevice(SimDevice):
    """SCD4x: periodic mode 0x21B1 (a value every 5000 ms), 0xE4B8 data-ready, 0xEC05 read."""

    def __init__(self, clock, co2=612, temp=22.0, humidity=40.0):
        super().__init__(clock)
        self.co2 = co2
        self.temp = temp
        self.humidity = humidity
        self.started_at = None
        self.last_read_period = 0
        self.pending = None
        self.command_at = 0

    def _period(self):
        return (self.clock.ms - self.started_at) // 5000

    def write(self, data):
        self.command_at = self.clock.ms
        if data == b"\x21\xb1":
            self.started_at = self.clock.ms
            self.last_read_period = 0
            self.pending = None
        elif data == b"\x3f\x86":  # stop periodic measurement
            self.started_at = None
        elif data == b"\xe4\xb8":
            ready = self.started_at is not None and self._period() > self.last_read_period
            self.pending = _words(0x8006 if ready else 0x8000)
        elif data == b"\xec\x05":
            if self.started_at is None:
                raise OSError(_EIO)  # not in periodic mode: the part NACKs the command
            self.last_read_period = self._period()
            t = round((self.temp + 45) * 65535 / 175)
            rh = round(self.humidity * 65535 / 100)
            self.pending = _words(self.co2, t, rh)
        else:
            raise OSError(_EIO)

    def read(self, n):
        if self.pending is None or self.clock.ms < self.command_at + 1:
            raise OSError(_ENODEV)  # read too early, or nothing asked
        data, self.pending = self.pending, None
        return self._answer(data)[:n]


class OneWireBus:
    """``onewire.OneWire``-like: ``reset``, ``writebyte``, ``write``, ``readbyte``, ``readinto``."""

    def __init__(self, clock):
        self.clock = clock
        self.devices = []
        self._selected = []
        self._rom_phase = None
        self._rom_buf = b""

    def attach(self, device):
        self.devices.append(device)
        return device

    def reset(self, required=False):
        present = [d for d in self.devices if d.mode != "missing"]
        self._selected = []
        self._rom_phase = "rom"
        if required and not present:
            raise OSError(_ENODEV)
        return bool(present)

    def writebyte(self, value):
        if self._rom_phase == "rom":
            if value == 0xCC:
                self._selected = [d for d in self.devices if d.mode != "missing"]
                self._rom_phase = None
            elif value == 0x55:
                self._rom_phase = "match"
                self._rom_buf = b""
            return
        if self._rom_phase == "match":
            self._rom_buf += bytes((value,))
            if len(self._rom_buf) == 8:
                self._selected = [
                    d for d in self.devices if d.rom == self._rom_buf and d.mode != "missing"
                ]
                self._rom_phase = None
            return
        for d in self._selected:
            d.function(value)

    def write(self, buf):
        for b in buf:
            self.writebyte(b)

    def readbyte(self):
        out = bytearray(1)
        self.readinto(out)
        return out[0]

    def readinto(self, buf):
        if not self._selected:  # nobody drives the bus: the pull-up reads all ones
            for i in range(len(buf)):
                buf[i] = 0xFF
            return
        data = self._selected[0].read(len(buf))
        buf[:] = data


class DS18B20Device(SimDevice):
    """DS18B20: convert T 0x44 (750 ms at 12 bits), read scratchpad 0xBE (9 bytes + CRC)."""

    def __init__(self, clock, temp=12.5, rom=None):
        super().__init__(clock)
        self.temp = temp
        rom = bytes((rom or b"\x28\x01\x02\x03\x04\x05\x06")[:7])
        self.rom = rom + bytes((_crc8_maxim(rom),))
        self.raw = 0x0550  # power-on value: 85.0 °C
        self.done_at = None
        self.out = b""

    def function(self, value):
        if value == 0x44:
            self.done_at = self.clock.ms + 750
        elif value == 0xBE:
            raw = self.raw
            if self.done_at is not None and self.clock.ms >= self.done_at:
                raw = int(self.temp * 16) & 0xFFFF
                self.raw = raw
            pad = bytes((raw & 0xFF, raw >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10))
            self.out = self._answer(pad + bytes((_crc8_maxim(pad),)))

    def read(self, n):
        data, self.out = self.out[:n], self.out[n:]
        return data + b"\xff" * (n - len(data))


class SimADC:
    """``machine.ADC``-like channel: ``read_u16`` returns ``raw``; ``missing`` raises."""

    def __init__(self, raw=32768):
        self.raw = raw
        self.mode = "ok"

    def read_u16(self):
        if self.mode == "missing":
            raise OSError(_EIO)
        return self.raw
