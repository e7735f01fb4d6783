"""The MicroPython unix port as a board: simulated sensor parts, the host's network and clock.

The real drivers run against ``sensors.sim`` parts (same datasheet protocols as the tests);
the device id comes from the configuration (``"device"``), since a laptop's MAC is not the
device's. No watchdog. The host clock is NTP-disciplined, so ``unix_time`` is trusted unless
the configuration says ``"clock": "none"`` (to try the no-NTP path).
"""

import time

from ..sensors import sim
from . import BaseBoard

SIM_I2C_PARTS = {"sht3x": sim.SHT3xDevice, "scd4x": sim.SCD4xDevice}


class Board(BaseBoard):
    name = "unix"

    def __init__(self, config=None):
        super().__init__(config)
        self.clock = sim.TicksClock()
        self._clock_set = self.config.get("clock", "host") == "host"

    def device_id(self):
        device = self.config.get("device")
        if not device:
            raise ValueError('unix board: the configuration must name the "device" URN')
        return device

    def free_heap(self):
        import gc

        return gc.mem_free()

    def ticks_ms(self):
        return time.ticks_ms()

    def unix_time(self):
        return int(time.time()) if self._clock_set else None

    def i2c(self, bus_id, sda, scl, freq):
        return sim.I2CBus(self.clock)

    def onewire(self, pin):
        return sim.OneWireBus(self.clock)

    def adc(self, pin):
        return sim.SimADC()

    def sensor(self, spec):
        driver = BaseBoard.sensor(self, spec)
        kind = spec["type"]
        if kind in SIM_I2C_PARTS:  # put the part on the simulated bus at its address
            driver.i2c.attach(driver.address, SIM_I2C_PARTS[kind](self.clock))
        elif kind == "ds18b20":
            rom = spec.get("rom")
            part = sim.DS18B20Device(self.clock, rom=bytes.fromhex(rom) if rom else None)
            driver.ow.attach(part)
        return driver
