"""Board support: ``board_class()`` is the class of the board the agent runs on.

Every board has the same members: ``name``, ``device_id()`` (RFC 9039
``urn:dev:mac:<12 hex>``: ``mcu.mac_urn``; the unix board's from its configuration),
``connect_network() -> bool``, ``wdt_feed()``, ``free_heap()``, ``ticks_ms()``,
``unix_time()`` (None until NTP set the clock), ``sensors(config)``; and, before any
configuration exists (``main.boot``: an unprovisioned device has none), class methods
for the boot: ``flash_root()``, ``provisioning_uart()`` (the line the technician's laptop
talks to; None: no provisioning mode), ``info(root)`` (``{"model", "serial", "device",
"firmware"}``, what provisioning reports) and ``reset()``. ``board_class()`` picks the
class.

What every board shares is ``BaseBoard`` here (the sensor wiring among it); what boards
with MicroPython's ``machine`` module share (UART, I2C, 1-Wire, ADC, the chip's id, NTP) is
``mcu.McuBoard``, which the unix board does not load: every function and name of a module
the board loads stays on its heap. ``esp32.py`` and ``rp2.py`` hold only their constants
(pins, PHY, timeouts) and wiring (which network); ``unix.py`` the simulated parts.
"""

import gc
import sys
import time

from ..sensors import SensorFault


class FaultySensor:
    """Stands in for a sensor whose bus could not be set up: every read reports why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def read(self) -> list:
        raise SensorFault(self.reason)


class BaseBoard:
    name = "base"
    model = "ce-gw-1"  # the hardware model provisioning reports

    # -- boot (class methods: no configuration yet) -----------------------------

    @classmethod
    def flash_root(cls) -> str:
        return "/"

    @classmethod
    def run_agent(cls, agent: object) -> None:
        """Run the agent forever (returns only if a task fails)."""
        import asyncio

        agent.board.connect_network()  # type: ignore[attr-defined]
        asyncio.run(agent.run())  # type: ignore[attr-defined]

    def __init__(self, config: dict | None = None) -> None:
        # the board keeps only the keys it reads after boot, not the whole parsed file
        # (0.9 KiB on the unix port): the device URN and the Wi-Fi fallback
        config = config or {}
        self.config = {k: config[k] for k in ("device", "wifi") if k in config}
        self._buses = {}  # type: dict
        self._clock_set = False

    # -- identity, health, time ---------------------------------------------

    def connect_network(self) -> bool:
        return True

    def wdt_feed(self) -> None:
        pass

    def free_heap(self) -> int:
        return gc.mem_free()

    def ticks_ms(self) -> int:
        return time.ticks_ms()

    # -- sensors: ``i2c(bus_id, sda, scl, freq)``, ``onewire(pin)`` and ``adc(pin)`` are the
    # board's (``mcu.McuBoard``: ``machine``'s buses; the unix board: simulated ones) -----

    def i2c_bus(self, spec: dict) -> object:
        """The I2C bus a sensor entry names (``i2c``, ``sda``, ``scl``, ``freq``), made
        once per bus id and shared by the sensors on it."""
        n = spec.get("i2c", 0)
        bus = self._buses.get(n)
        if bus is None:
            bus = self._buses[n] = self.i2c(  # type: ignore[attr-defined]
                n, spec["sda"], spec["scl"], spec.get("freq", 100000))
        return bus

    def onewire_bus(self, pin: int) -> object:
        """The 1-Wire bus on ``pin``, made once per pin (keyed ``~pin``: never an I2C id)."""
        bus = self._buses.get(~pin)
        if bus is None:
            bus = self._buses[~pin] = self.onewire(pin)  # type: ignore[attr-defined]
        return bus

    def sensor(self, spec: dict) -> object:
        """The driver for one (validated) ``config.sensors`` entry, wired to this board by
        its module's ``wire(board, spec)``. Only the modules of the types the configuration
        names are loaded: every name of a loaded module stays interned ("Memory on the
        device" in docs/ARCHITECTURE.md)."""
        kind = spec["type"]
        if kind not in ("sht3x", "scd4x", "ds18b20", "adc"):
            raise ValueError("unknown sensor type %r" % kind)
        return __import__("cityedge_fw.sensors." + kind, None, None, ("wire",)).wire(self, spec)

    def sensors(self, config: dict) -> list:
        """Drivers for ``config["sensors"]``; a bus that cannot be set up is a reported fault."""
        out = []
        for spec in config.get("sensors", ()):
            try:
                out.append(self.sensor(spec))
            except (OSError, ValueError, ImportError) as e:
                out.append(FaultySensor(spec.get("name", "?"), "bus setup failed: %s" % e))
        return out


def board_class() -> type:
    """The board class for this port (``sys.platform``): esp32, rp2, or the unix port."""
    if sys.platform == "esp32":
        from .esp32 import Board  # on its own port only: it imports esp32, network
    elif sys.platform == "rp2":
        from .rp2 import Board  # on its own port only: it imports rp2, network
    elif sys.platform in ("linux", "darwin"):
        from .unix import Board  # the simulated board
    else:
        raise ValueError("cityedge: no board support for platform %r" % sys.platform)
    return Board
