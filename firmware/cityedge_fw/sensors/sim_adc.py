"""A simulated ADC channel (the unix board and the tests; see ``sim``)."""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


_EIO = const(5)  # errno, as ``sim``'s


class SimADC:
    """``machine.ADC``-like channel: ``read_u16`` returns ``raw``; ``missing`` raises."""

    def __init__(self, raw=32768):
        self.raw = raw
        self.mode = "ok"

    def read_u16(self):
        if self.mode == "missing":
            raise OSError(_EIO)
        return self.raw
