"""The MicroPython unix port as a board: simulated sensor parts, the host's network and clock.

The real drivers run against simulated parts (``sensors.sim`` and its sibling modules; the
same datasheet protocols as the tests); the device id comes from the configuration
(``"device"``), since a laptop's MAC is not the device's. No watchdog. The host clock is
NTP-disciplined, so ``unix_time`` is trusted unless the configuration says ``"clock":
"none"`` (to try the no-NTP path).

The boot (``main.boot``) takes from the environment what a board has in hardware:

``CITYEDGE_FLASH``   the flash root, a host directory (default: the current directory)
``CITYEDGE_FLASH_IMAGE`` ``PATH:BLOCKS:BLOCK_SIZE``: a LittleFS image in a host file
                     (``FileFlash``) mounted at ``/flash``, the flash root unless
                     ``CITYEDGE_FLASH`` names another (the simulator keeps its ring
                     buffer there: stopping and starting it is a power cycle)
``CITYEDGE_SECONDS`` stop the agent after this many seconds (the simulator's ``--seconds``)
``CITYEDGE_REPORT``  ``1``: print a line on stdout whenever the agent's counters move
                     (after ``micropython.qstr_info()``'s, the interned names' pools)
``CITYEDGE_UART``    ``stdio``: the provisioning line is the process's stdin/stdout (a
                     pseudo-terminal, as ``cityedge_provision.simdevice`` runs it); unset:
                     no provisioning mode, the agent starts (the simulator, the tests)
``CITYEDGE_SERIAL``, ``CITYEDGE_DEVICE``, ``CITYEDGE_MODEL``: what provisioning reports
(a board reads them from its chip; the device URN defaults to the configuration's)

The provisioning line, ``info`` and the flash image are in ``unix_io``, loaded only when the
environment asks for them.
"""

import os
import sys
import time

from . import BaseBoard

try:
    _ticks_ms = time.ticks_ms  # the simulated parts' clock
except AttributeError:  # CPython (the boot tests make this board there)

    def _ticks_ms():
        return int(time.monotonic() * 1000)


async def _report(agent):
    import asyncio
    import gc

    import micropython

    last = None
    while True:
        now = (agent.writer.seq, agent.store.count, agent.published, agent.link.connects,
               agent.mem_errors)
        if now != last:
            gc.collect()
            micropython.qstr_info()  # the interned names' pools: none may be added
            print("sim: seq=%d buffered=%d published=%d connects=%d mem_errors=%d heap_free=%d"
                  " %s" % (
                now + (gc.mem_free(), agent.last_error or agent.link.last_error or "")))
            last = now
        await asyncio.sleep_ms(1000)


async def _supervise(agent, ms, tasks):
    """The simulator's ``--seconds``: the agent (and the report, if any) for ``ms``."""
    import asyncio

    tasks.append(asyncio.create_task(agent.run()))
    await asyncio.sleep_ms(ms)
    for t in tasks:
        t.cancel()
    await asyncio.sleep_ms(10)


class Board(BaseBoard):
    name = "unix"
    model = "ce-sim-1"

    @classmethod
    def flash_root(cls):
        image = os.getenv("CITYEDGE_FLASH_IMAGE")
        mounted = None
        if image:
            from .unix_io import mount_image

            mounted = mount_image(image)
        return os.getenv("CITYEDGE_FLASH") or mounted or "."

    @classmethod
    def reset(cls):
        sys.exit(0)  # the unix port has no machine.reset: the process ends, as a board resets

    @classmethod
    def run_agent(cls, agent):
        """Run the agent (``main.boot``): until ``CITYEDGE_SECONDS`` passed, if set. Without
        it the agent's task is the only one a board has (and the report's, when asked
        for): no supervising coroutine and task on the heap beside them."""
        import asyncio

        tasks = []
        if os.getenv("CITYEDGE_REPORT") == "1":
            print("sim: %s boot %d on %s, chain at seq %d, %d batches buffered" % (
                agent.device, agent.boot, agent.board.name, agent.writer.seq,
                agent.store.count))
            tasks.append(asyncio.create_task(_report(agent)))  # runs with the agent's
        agent.board.connect_network()
        ms = int(float(os.getenv("CITYEDGE_SECONDS") or 0) * 1000)
        asyncio.run(_supervise(agent, ms, tasks) if ms else agent.run())

    @classmethod
    def provisioning_uart(cls):
        if not os.getenv("CITYEDGE_UART"):
            return None
        from .unix_io import stdio_uart

        return stdio_uart()

    @classmethod
    def info(cls, root):
        from .unix_io import info

        return info(cls.model)

    def __init__(self, config=None):
        super().__init__(config)
        self._clock_set = (config or {}).get("clock", "host") == "host"
        self.clock = _ticks_ms  # the simulated parts' clock (milliseconds)

    def device_id(self):
        device = self.config.get("device")
        if not device:
            raise ValueError('unix board: the configuration must name the "device" URN')
        return device

    def unix_time(self):
        return int(time.time()) if self._clock_set else None

    # the simulated parts load with the first sensor, each bus and part with the first
    # sensor that needs it: a board without sensors never has them; the parts other than
    # the SHT3x come through ``unix_parts``, loaded only for a sensor of theirs
    def i2c(self, bus_id, sda, scl, freq):
        from ..sensors.sim import I2CBus

        return I2CBus(self.clock)

    def onewire(self, pin):
        from .unix_parts import onewire

        return onewire(self.clock)

    def adc(self, pin):
        from .unix_parts import adc

        return adc()

    def sensor(self, spec):
        driver = BaseBoard.sensor(self, spec)
        kind = spec["type"]
        if kind == "sht3x":  # put the part on the simulated bus at its address
            from ..sensors.sim import SHT3xDevice

            driver.i2c.attach(driver.address, SHT3xDevice(self.clock))
        elif kind != "adc":
            from .unix_parts import attach

            attach(driver, spec, self.clock)
        return driver
