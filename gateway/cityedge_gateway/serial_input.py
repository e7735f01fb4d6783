"""A serial sensor on a UART: pyserial + asyncio around the sans-IO protocol parsers.

``SerialInput.run()`` opens the port, feeds what arrives to the protocol's parser
(``Sds011Parser`` or ``ModbusPoller``), hands readings to a sink, and counts everything
else in ``InputStats``: checksum failures, garbage bytes, Modbus exceptions and timeouts,
values that are not finite (never signed), disconnects. An unplugged cable (the port
vanishes or read fails) is counted and the port is reopened with a growing, capped
backoff; the service never stops because of a sensor.

The port is read without blocking via ``loop.add_reader`` on its file descriptor (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import serial

from cityedge_host.backoff import Backoff

from . import limits
from .config import SerialConfig
from .modbus import ModbusPoller
from .readings import Event, FrameError, Reading
from .sds011 import Sds011Parser

log = logging.getLogger(__name__)

ReadingSink = Callable[[list[Reading], float], None]


@dataclass
class InputStats:
    """Counters of one serial input (exported in status and /metrics)."""

    connected: bool = False
    readings: int = 0
    bytes_in: int = 0
    disconnects: int = 0
    open_failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count (FrameError.kind,
    # or not_finite: a NaN or infinite value, not signed)
    discarded_bytes: int = 0


class SerialInput:
    def __init__(
        self, cfg: SerialConfig, sink: ReadingSink, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.clock = clock
        self.stats = InputStats()
        self.modbus: ModbusPoller | None = None
        self.sds011: Sds011Parser | None = None
        if cfg.protocol == "modbus":
            self.modbus = ModbusPoller(cfg.name, cfg.unit, list(cfg.registers))
        else:
            self.sds011 = Sds011Parser(cfg.name)

    def _handle(self, events: list[Event]) -> None:
        readings = []
        for e in events:
            if isinstance(e, FrameError):
                self.stats.errors[e.kind] += 1
                self.stats.discarded_bytes += e.discarded
                log.debug("%s: %s %s", self.cfg.name, e.kind, e.detail)
            elif e.value - e.value != 0:  # NaN or infinity (a scale that overflows): a
                # fault, never signed (the fleet would refuse the whole batch)
                self.stats.errors["not_finite"] += 1
                log.debug("%s: %s is %r", self.cfg.name, e.name, e.value)
            else:
                readings.append(e)
        if readings:
            self.stats.readings += len(readings)
            self.sink(readings, self.clock())

    def _on_bytes(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if self.modbus is not None:
            self._handle(self.modbus.feed(data, time.monotonic()))
        elif self.sds011 is not None:
            self._handle(self.sds011.feed(data))

    async def run(self) -> None:
        """Read the port forever, reopening it after a disconnect."""
        backoff = Backoff(limits.SERIAL_REOPEN_MIN_S, limits.SERIAL_REOPEN_MAX_S)
        while True:
            try:
                port = serial.Serial(self.cfg.port, self.cfg.baud, timeout=0)
            except (serial.SerialException, OSError) as e:
                self.stats.open_failures += 1
                log.warning("%s: cannot open %s: %s", self.cfg.name, self.cfg.port, e)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.stats.connected = True
            try:
                await self._serve(port)
            finally:
                self.stats.connected = False
                port.close()
            self.stats.disconnects += 1
            log.warning("%s: %s disconnected; reopening", self.cfg.name, self.cfg.port)
            await asyncio.sleep(backoff.next())

    async def _serve(self, port: serial.Serial) -> None:
        """Until the port fails: read what arrives; for Modbus, poll and time out."""
        loop = asyncio.get_running_loop()
        lost = asyncio.Event()

        def readable() -> None:
            try:
                data = port.read(limits.SERIAL_READ_BYTES)
            except (serial.SerialException, OSError):
                loop.remove_reader(port.fileno())
                lost.set()
                return
            if data:
                self._on_bytes(data)

        fd = port.fileno()
        loop.add_reader(fd, readable)
        try:
            if self.modbus is None:
                await lost.wait()
                return
            while not lost.is_set():
                try:
                    port.write(self.modbus.request(time.monotonic()))
                except (serial.SerialException, OSError):
                    return
                deadline = time.monotonic() + self.cfg.poll_interval_s
                while not lost.is_set() and time.monotonic() < deadline:
                    wait = min(0.05, max(0.0, deadline - time.monotonic()))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), wait)
                    self._handle(self.modbus.check_timeout(time.monotonic()))
                if self.modbus.pending:  # answer still missing at the next poll
                    self._handle([FrameError("timeout", "no answer before next poll", 0)])
        finally:
            if not lost.is_set():
                loop.remove_reader(fd)
