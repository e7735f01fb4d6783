"""Serial inputs over a real pseudo-terminal: pyserial on the gateway's end, a simulated
sensor on the other, with corruption, garbage and an unplugged (closed) cable."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from cityedge_gateway import modbus, sds011
from cityedge_gateway.config import SerialConfig
from cityedge_gateway.modbus import Register
from cityedge_gateway.readings import Reading
from cityedge_gateway.serial_input import SerialInput

from support.pty import Pty


async def _until(cond: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def test_sds011_over_pty_with_corruption_and_unplugged_cable(tmp_path: Path) -> None:
    got: list[tuple[str, float]] = []

    def sink(readings: list[Reading], t: float) -> None:
        got.extend((r.name, r.value) for r in readings)

    async def scenario() -> SerialInput:
        link = tmp_path / "ttyUSB0"
        pty = Pty(link)
        inp = SerialInput(SerialConfig("pm", str(link), "sds011", 9600), sink)
        task = asyncio.create_task(inp.run())
        await _until(lambda: inp.stats.connected)
        bad = bytearray(sds011.encode_frame(500, 600))
        bad[3] ^= 0x40
        frame = sds011.encode_frame(123, 456)
        pty.write(b"\x01\x02" + frame[:4])  # garbage, then half a frame
        await asyncio.sleep(0.05)
        pty.write(frame[4:] + bytes(bad) + sds011.encode_frame(7, 8))
        await _until(lambda: len(got) == 4)
        pty.unplug()  # cable pulled: read fails, the port is gone
        await _until(lambda: inp.stats.disconnects == 1)
        await _until(lambda: inp.stats.open_failures >= 1)
        assert not task.done()
        pty2 = Pty(link)  # plugged back in
        await _until(lambda: inp.stats.connected, timeout=10)
        pty2.write(sds011.encode_frame(9, 10))
        await _until(lambda: len(got) == 6)
        task.cancel()
        pty2.unplug()
        return inp

    inp = asyncio.run(scenario())
    assert got == [
        ("pm/pm25", 12.3), ("pm/pm10", 45.6), ("pm/pm25", 0.7), ("pm/pm10", 0.8),
        ("pm/pm25", 0.9), ("pm/pm10", 1.0),
    ]  # fmt: skip
    assert inp.stats.errors == {"garbage": 1, "checksum": 1}
    assert inp.stats.discarded_bytes == 2 + 10
    assert inp.stats.readings == 6


def test_modbus_over_pty_polls_a_simulated_slave(tmp_path: Path) -> None:
    regs = [Register("temp", 10, "Cel", type="s16", scale=0.1), Register("rh", 11, "%RH")]
    answers = [
        modbus.read_holding_response(5, [(-15) & 0xFFFF, 40]),
        modbus.exception_response(5, 6),  # busy
        b"",  # no answer: timeout
        b"\xff\x00" + modbus.read_holding_response(5, [215, 41]),  # noise, then the answer
    ]
    requests: list[bytes] = []
    link = tmp_path / "ttyUSB1"
    pty = Pty(link)

    def slave() -> None:
        for answer in answers:
            req = b""
            while len(req) < 8:
                req += os.read(pty.master, 8 - len(req))
            requests.append(req)
            if answer:
                os.write(pty.master, answer)

    sim = threading.Thread(target=slave, daemon=True)
    sim.start()
    got: list[tuple[str, float]] = []
    cfg = SerialConfig("env", str(link), "modbus", 19200, 5, 0.3, tuple(regs))

    async def scenario() -> SerialInput:
        inp = SerialInput(cfg, lambda rs, t: got.extend((r.name, round(r.value, 3)) for r in rs))
        inp.pollers[0].timeout_s = 0.2
        task = asyncio.create_task(inp.run())
        await _until(lambda: len(got) == 4, timeout=10)
        task.cancel()
        return inp

    inp = asyncio.run(scenario())
    sim.join(1)
    pty.unplug()
    assert requests[0] == modbus.read_holding_request(5, 10, 2)
    assert all(r == requests[0] for r in requests)
    assert got == [("env/temp", -1.5), ("env/rh", 40), ("env/temp", 21.5), ("env/rh", 41)]
    assert inp.stats.errors == {"exception": 1, "timeout": 1, "garbage": 1}
