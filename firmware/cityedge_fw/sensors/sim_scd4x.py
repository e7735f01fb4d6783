"""Simulated Sensirion SCD4x on the simulated I2C bus (``sim``): the unix board and the tests."""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from .sim import SimDevice, _words

_EIO = const(5)  # errno values, as ``sim``'s
_ENODEV = const(19)


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
        return (self.clock() - self.started_at) // 5000

    def write(self, data):
        self.command_at = self.clock()
        if data == b"\x21\xb1":
            self.started_at = self.clock()
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
        if self.pending is None or self.clock() < self.command_at + 1:
            raise OSError(_ENODEV)  # read too early, or nothing asked
        data, self.pending = self.pending, None
        return self._answer(data)[:n]
