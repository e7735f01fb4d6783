"""Several Modbus slaves on one bus, end to end: the gateway (its config file, its
``SerialInput`` on pyserial, its signing store, its status and metrics) polls a simulated
RS-485 line on a real pseudo-terminal. On the line: an energy meter (input registers,
IEEE-754 floats, the Eastron SDM120 map), an environment sensor (holding registers), a
slave that never answers and one that answers garbage with a bad CRC."""

from __future__ import annotations

import asyncio
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cityedge_core import chain
from cityedge_gateway import modbus
from cityedge_gateway.config import load_config
from cityedge_gateway.metrics import metrics_text, registry_for
from cityedge_gateway.service import Gateway
from cityedge_gateway.status import status_map
from cityedge_host.crypto import EcSigner

from support.pty import Pty

GW = "urn:dev:mac:b827ebfffe123456"

METER = {0x00: 230.1, 0x06: 5.25, 0x0C: 1207.5, 0x46: 49.98, 0x48: 12345.67}  # V A W Hz kWh
ENV = {0: (-15) & 0xFFFF, 1: 405, 2: 70000 & 0xFFFF, 3: 70000 >> 16}  # s16, u16, u32 CDAB

CONFIG = """
[gateway]
device = "%(gw)s"
key_file = "gw.key"
batch_readings = 8

[store]
path = "buffer.sqlite"

[[serial]]
name = "bus"
port = "%(port)s"
protocol = "modbus"
baud = 19200
parity = "even"
poll_interval_s = 0.2
timeout_s = 1.0

[[serial.slaves]]
name = "meter"
unit = 1
max_registers = 40
registers = [
  { name = "voltage", address = 0x00, unit = "V", table = "input", type = "f32" },
  { name = "current", address = 0x06, unit = "A", table = "input", type = "f32" },
  { name = "power", address = 0x0C, unit = "W", table = "input", type = "f32" },
  { name = "frequency", address = 0x46, unit = "Hz", table = "input", type = "f32" },
  { name = "energy", address = 0x48, unit = "kWh", table = "input", type = "f32" },
]

[[serial.slaves]]
name = "env"
unit = 2
registers = [
  { name = "temp", address = 0, unit = "Cel", type = "s16", scale = 0.1 },
  { name = "rh", address = 1, unit = "%%RH", scale = 0.1 },
  { name = "count", address = 2, unit = "1", type = "u32", order = "CDAB" },
]

[[serial.slaves]]
name = "silent"
unit = 3
registers = [{ name = "x", address = 0, unit = "1" }]

[[serial.slaves]]
name = "noisy"
unit = 4
registers = [{ name = "x", address = 0, unit = "1" }]
"""


class Line:
    """The slaves' side of the line: reads each request off the pty and answers as the
    addressed slave would. Records every request, and any request that arrived while an
    earlier one was still unanswered (the master must wait: RTU is half-duplex)."""

    def __init__(self, fd: int, slaves: dict[int, Callable[[int, int, int], bytes]]) -> None:
        self.fd = fd
        self.slaves = slaves
        self.requests: list[tuple[int, int, int, int]] = []
        self.overlaps = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self, n: int) -> bytes:
        got = b""
        while len(got) < n and not self.stop.is_set():
            if select.select([self.fd], [], [], 0.05)[0]:
                got += os.read(self.fd, n - len(got))
        return got

    def _run(self) -> None:
        while not self.stop.is_set():
            req = self._read(8)
            if len(req) < 8:
                return
            assert modbus.crc16(req[:6]) == req[6] | req[7] << 8, req.hex()
            unit, fn = req[0], req[1]
            start, count = req[2] << 8 | req[3], req[4] << 8 | req[5]
            self.requests.append((unit, fn, start, count))
            answer = self.slaves[unit](fn, start, count)
            if select.select([self.fd], [], [], 0)[0]:
                self.overlaps += 1  # the master wrote again before this answer
            if answer:
                os.write(self.fd, answer)


def meter(fn: int, start: int, count: int) -> bytes:
    if fn != modbus.FN_READ_INPUT:
        return modbus.exception_response(1, 1, fn)  # illegal function
    regs = [0] * count
    for addr, value in METER.items():
        if start <= addr < start + count:
            regs[addr - start : addr - start + 2] = modbus.encode_value("f32", "ABCD", value)
    return modbus.read_response(1, fn, regs)


def env(fn: int, start: int, count: int) -> bytes:
    return modbus.read_response(2, fn, [ENV.get(a, 0) for a in range(start, start + count)])


def noisy(fn: int, start: int, count: int) -> bytes:
    bad = bytearray(modbus.read_response(4, fn, [7] * count))
    bad[-1] ^= 0xFF
    return b"\x00\xff" + bytes(bad)


EXPECTED = [
    ("bus/meter/voltage", "V", 230.1), ("bus/meter/current", "A", 5.25),
    ("bus/meter/power", "W", 1207.5), ("bus/meter/frequency", "Hz", 49.98),
    ("bus/meter/energy", "kWh", 12345.67), ("bus/env/temp", "Cel", -1.5),
    ("bus/env/rh", "%RH", 40.5), ("bus/env/count", "1", 70000.0),
]


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_two_live_slaves_a_silent_one_and_a_noisy_one_share_a_bus(tmp_path: Path) -> None:
    signer = EcSigner.generate()
    signer.save(tmp_path / "gw.key")
    pty = Pty(tmp_path / "ttyRS485")
    (tmp_path / "gateway.toml").write_text(CONFIG % {"gw": GW, "port": pty.link})
    gw = Gateway(load_config(tmp_path / "gateway.toml"))
    [bus] = gw.inputs
    line = Line(pty.master, {1: meter, 2: env, 3: lambda *a: b"", 4: noisy})
    slaves = bus.stats.slaves
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        ready = asyncio.Event()
        run = asyncio.create_task(gw.run(ready))
        await ready.wait()
        # three rounds: the silent slave's timeouts hold up nobody for good
        await _until(lambda: slaves["silent"].errors["timeout"] >= 3
                     and slaves["noisy"].errors["checksum"] >= 3)
        # what the gateway signed, its status and metrics, at one moment (no await)
        gw.flush(force=True)
        seen["batches"] = [s.data for s in gw.store.oldest(100)]
        seen["status"] = status_map(gw)["inputs"]["bus"]
        seen["metrics"] = metrics_text(registry_for(gw))
        seen["counts"] = {n: (s.readings, dict(s.errors)) for n, s in slaves.items()}
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        line.stop.set()
        line.thread.join(5)
        pty.unplug()
    # one round: each slave's blocks in turn, one request on the line at a time
    assert line.requests[:5] == [(1, 4, 0x00, 14), (1, 4, 0x46, 4), (2, 3, 0, 4), (3, 3, 0, 1),
                                 (4, 3, 0, 1)]
    assert line.overlaps == 0
    assert all(r == line.requests[i % 5] for i, r in enumerate(line.requests))
    # every counter lands on its own slave; nothing arrived unasked
    assert slaves["meter"].errors == {} and slaves["env"].errors == {}
    assert set(slaves["silent"].errors) == {"timeout"}
    assert set(slaves["noisy"].errors) == {"garbage", "checksum"}
    assert slaves["silent"].readings == slaves["noisy"].readings == 0
    assert slaves["meter"].readings >= 15 and slaves["env"].readings >= 9
    total = sum((s.errors for s in slaves.values()), start=bus.stats.errors.__class__())
    assert bus.stats.errors == total
    # the readings, signed by the gateway, carry the meter's and the sensor's values
    verifier = chain.BatchVerifier({signer.kid: chain.KeyEntry(GW, signer.verifier())})
    verdicts = [verifier.check(data) for data in seen["batches"]]
    assert {v.status for v in verdicts} == {"ok"}
    records = [(r[0], r[1], r[2]) for v in verdicts for r in v.batch.records]
    assert records[:8] == EXPECTED
    assert set(records) == set(EXPECTED)
    assert len(records) == seen["counts"]["meter"][0] + seen["counts"]["env"][0]
    # status and metrics show each slave's share
    st, counts = seen["status"]["slaves"], seen["counts"]
    assert st["silent"] == {"readings": 0, "errors": counts["silent"][1]}
    assert st["meter"] == {"readings": counts["meter"][0], "errors": {}}
    assert ('cityedge_gateway_modbus_slave_errors_total{input="bus",kind="timeout",'
            'slave="silent"} %s' % float(counts["silent"][1]["timeout"])) in seen["metrics"]
    assert ('cityedge_gateway_modbus_slave_readings_total{input="bus",slave="env"} %s'
            % float(counts["env"][0])) in seen["metrics"]
