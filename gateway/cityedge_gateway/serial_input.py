"""A serial sensor on a UART: pyserial + asyncio around the sans-IO protocol parsers.

``SerialInput.run()`` opens the port, feeds what arrives to the protocol's parser
(``Sds011Parser``, or the ``ModbusPoller`` of the slave whose request is outstanding),
hands readings to a sink, and counts everything else in ``InputStats``: checksum
failures, garbage bytes, Modbus exceptions and timeouts, values that are not finite (never
signed), disconnects. An unplugged cable (the port vanishes or read fails) is counted and
the port is reopened with a growing, capped backoff; the service never stops because of a
sensor.

Modbus: every ``poll_interval_s`` the port polls its slaves in turn, each slave's blocks in
turn, one request on the bus at a time (RTU is half-duplex): it writes a request after the
frame's silent interval and waits for the answer, an exception, a bad CRC or the timeout
before the next. A slave that does not answer costs the others one timeout per block. With
several (named) slaves each one's readings and errors are also counted on its own
(``InputStats.slaves``); bytes that arrive with no request outstanding belong to nobody
and are counted for the port only.

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
from .modbus import ModbusPoller, silent_interval_s
from .readings import Event, FrameError, Reading
from .sds011 import Sds011Parser

log = logging.getLogger(__name__)

ReadingSink = Callable[[list[Reading], float], None]
_PARITY = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN, "odd": serial.PARITY_ODD}


@dataclass
class SlaveStats:
    """One slave's share of its port's counters (several slaves on one bus)."""

    readings: int = 0
    errors: Counter[str] = field(default_factory=Counter)


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
    slaves: dict[str, SlaveStats] = field(default_factory=dict)  # named slaves only


class SerialInput:
    def __init__(
        self, cfg: SerialConfig, sink: ReadingSink, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.clock = clock
        self.stats = InputStats()
        self.pollers: list[ModbusPoller] = []
        self.sds011: Sds011Parser | None = None
        self._slave_names: dict[int, str] = {}  # id(poller) -> slave name
        self._active: ModbusPoller | None = None  # whose request went out last
        self._wake: asyncio.Event | None = None
        if cfg.protocol == "modbus":
            for sl in cfg.modbus_slaves():
                prefix = cfg.name + "/" + sl.name if sl.name else cfg.name
                p = ModbusPoller(prefix, sl.unit, list(sl.registers), cfg.timeout_s,
                                 sl.max_registers, char_s=11 / cfg.baud)
                self.pollers.append(p)
                if sl.name:
                    self._slave_names[id(p)] = sl.name
                    self.stats.slaves[sl.name] = SlaveStats()
        else:
            self.sds011 = Sds011Parser(cfg.name)

    def _handle(self, events: list[Event], poller: ModbusPoller | None = None) -> None:
        """Count errors and pass readings on; ``poller``: the slave they belong to."""
        slave = self.stats.slaves.get(self._slave_names.get(id(poller), ""))
        readings = []
        for e in events:
            if isinstance(e, FrameError):
                self.stats.errors[e.kind] += 1
                self.stats.discarded_bytes += e.discarded
                if slave is not None:
                    slave.errors[e.kind] += 1
                log.debug("%s: %s %s", self.cfg.name, e.kind, e.detail)
            elif e.value - e.value != 0:  # NaN or infinity (a float register, a scale
                # that overflows): a fault, never signed (the fleet would refuse the batch)
                self.stats.errors["not_finite"] += 1
                if slave is not None:
                    slave.errors["not_finite"] += 1
                log.debug("%s: %s is %r", self.cfg.name, e.name, e.value)
            else:
                readings.append(e)
        if readings:
            self.stats.readings += len(readings)
            if slave is not None:
                slave.readings += len(readings)
            self.sink(readings, self.clock())

    def _on_bytes(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if self.pollers:
            p = self._active or self.pollers[0]
            owner = p if p.pending else None  # else "unexpected": nobody's
            self._handle(p.feed(data, time.monotonic()), owner)
        elif self.sds011 is not None:
            self._handle(self.sds011.feed(data))
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Read the port forever, reopening it after a disconnect."""
        backoff = Backoff(limits.SERIAL_REOPEN_MIN_S, limits.SERIAL_REOPEN_MAX_S)
        while True:
            try:
                port = serial.Serial(self.cfg.port, self.cfg.baud, timeout=0,
                                     parity=_PARITY[self.cfg.parity])
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
        wake = self._wake = asyncio.Event()  # set on bytes read and on loss

        def readable() -> None:
            try:
                data = port.read(limits.SERIAL_READ_BYTES)
            except (serial.SerialException, OSError):
                loop.remove_reader(port.fileno())
                lost.set()
                wake.set()
                return
            if data:
                self._on_bytes(data)

        fd = port.fileno()
        loop.add_reader(fd, readable)
        try:
            if not self.pollers:
                await lost.wait()
                return
            gap = silent_interval_s(self.cfg.baud)
            while not lost.is_set():
                deadline = time.monotonic() + self.cfg.poll_interval_s
                for p in self.pollers:
                    for block in range(len(p.blocks)):
                        if not await self._exchange(port, p, block, gap, lost, wake):
                            return
                while not lost.is_set() and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), deadline - time.monotonic())
        finally:
            self._wake = None
            if not lost.is_set():
                loop.remove_reader(fd)

    async def _exchange(self, port: serial.Serial, p: ModbusPoller, block: int, gap: float,
                        lost: asyncio.Event, wake: asyncio.Event) -> bool:
        """One request and its answer, exception, bad CRC or timeout; False: port lost."""
        await asyncio.sleep(gap)  # the bus is quiet: the last frame has ended
        if lost.is_set():
            return False
        self._active = p
        try:
            port.write(p.request(time.monotonic(), block))
        except (serial.SerialException, OSError):
            return False
        while p.pending and not lost.is_set():
            wake.clear()  # no await since p.pending was read: no bytes slip by
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0, p.deadline - time.monotonic()))
            self._handle(p.check_timeout(time.monotonic()), p)
        return not lost.is_set()
