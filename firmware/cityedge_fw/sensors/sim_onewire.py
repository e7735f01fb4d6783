"""Simulated 1-Wire bus and DS18B20 (the unix board and the tests; see ``sim``)."""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from .sim import SimDevice

_ENODEV = const(19)  # errno, as ``sim``'s


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
            self.done_at = self.clock() + 750
        elif value == 0xBE:
            raw = self.raw
            if self.done_at is not None and self.clock() >= self.done_at:
                raw = int(self.temp * 16) & 0xFFFF
                self.raw = raw
            pad = bytes((raw & 0xFF, raw >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10))
            self.out = self._answer(pad + bytes((_crc8_maxim(pad),)))

    def read(self, n):
        data, self.out = self.out[:n], self.out[n:]
        return data + b"\xff" * (n - len(data))
