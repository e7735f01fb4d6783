"""Simulated hardware for the firmware tests: flash that loses power, and sensor buses.

Pure Python that runs on MicroPython and CPython alike (no CPython-only imports), so the same
simulated devices serve bus-level tests under pytest and power-cut runs on the unix port.

- ``CutFlash``: a RAM block device for ``vfs.VfsLfs2`` (the extended ``readblocks`` /
  ``writeblocks`` / ``ioctl`` protocol) that can be told to fail or tear the N-th program or
  erase operation, like a power cut in the middle of a flash write.
- The sensor parts and buses (``I2CBus``, ``SHT3xDevice``, ``SCD4xDevice``, ``OneWireBus``,
  ``DS18B20Device``, ``SimADC``): they live in ``cityedge_fw.sensors.sim`` and its sibling
  modules because the unix board wires them too; re-exported here for the tests.
  (Needs ``firmware/`` on ``sys.path`` before the import.)
- ``SimClock``: milliseconds that pass only when a driver sleeps (the drivers' ``sleep``
  argument), so a test decides what a conversion delay sees.
"""

from cityedge_fw.sensors.sim import I2CBus, SHT3xDevice  # noqa: F401
from cityedge_fw.sensors.sim_adc import SimADC  # noqa: F401
from cityedge_fw.sensors.sim_onewire import DS18B20Device, OneWireBus  # noqa: F401
from cityedge_fw.sensors.sim_scd4x import SCD4xDevice  # noqa: F401

_EIO = 5
_ENODEV = 19


class SimClock:
    """Milliseconds that pass only when a driver sleeps (the drivers' ``sleep`` argument);
    a simulated part reads it by calling it, as the unix board's parts call
    ``time.ticks_ms``."""

    def __init__(self):
        self.ms = 0

    def __call__(self):
        return self.ms

    def sleep_ms(self, ms):
        self.ms += ms


class PowerCut(Exception):
    """Raised by ``CutFlash`` when the simulated power fails."""


class CutFlash:
    """RAM flash with a scheduled failure at operation ``cut_at`` (programs and erases count).

    ``mode``: ``"fail"`` the operation writes nothing and the device is dead from then on;
    ``"tear"`` the first ``tear_bytes`` of the program (or of the erase) land, then dead;
    ``"flaky"`` only that one operation fails (returns ``-EIO`` to LittleFS), later ones work.
    A dead device answers every later call with ``-EIO`` (no allocation: LittleFS may call it
    from a file's finaliser during garbage collection); ``image()`` is what is left on it.
    """

    def __init__(self, block_size, blocks, image=None, cut_at=-1, mode="fail", tear_bytes=0):
        self.block_size = block_size
        self.blocks = blocks
        if image is None:
            self.data = bytearray(b"\xff" * (block_size * blocks))
        else:
            self.data = bytearray(image)
        self.ops = 0
        self.cut_at = cut_at
        self.mode = mode
        self.tear_bytes = tear_bytes
        self.dead = False

    def image(self):
        return bytes(self.data)

    def _event(self, addr, new):
        """One program/erase of ``new`` at ``addr``: apply it (0), or fail it as scheduled."""
        op = self.ops
        self.ops += 1
        if op != self.cut_at:
            self.data[addr : addr + len(new)] = new
            return 0
        if self.mode == "flaky":
            return -_EIO
        self.dead = True
        if self.mode == "tear":
            n = self.tear_bytes % (len(new) + 1)
            self.data[addr : addr + n] = new[:n]
        raise PowerCut("power cut at flash operation %d" % op)

    def readblocks(self, block, buf, offset=0):
        if self.dead:
            return -_EIO
        addr = block * self.block_size + offset
        buf[:] = self.data[addr : addr + len(buf)]
        return 0

    def writeblocks(self, block, buf, offset=None):
        if self.dead:
            return -_EIO
        if offset is None:  # simple protocol: erase + program whole blocks
            offset = 0
        return self._event(block * self.block_size + offset, bytes(buf))

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.blocks
        if op == 5:  # block size
            return self.block_size
        if op == 6:  # erase block ``arg``
            if self.dead:
                return -_EIO
            return self._event(arg * self.block_size, b"\xff" * self.block_size)
        return 0
