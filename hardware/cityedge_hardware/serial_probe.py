"""The serial console probe: send a board the bytes that wake a MicroPython console, and a
cityedge ``hello``, and record what comes back (``serial_rules`` decides).

It opens the port with pyserial (DTR and RTS held low, so opening it does not reset an
ESP32 board into its bootloader) and writes exactly ``PROBE_STEPS`` and nothing else: two
Ctrl-C (interrupt a running program), CR (a fresh prompt), Ctrl-A (enter the raw REPL),
Ctrl-B (leave it again, printing the banner) and one ``hello`` frame, which every state of
the cityedge provisioning protocol answers without changing anything. No step writes to
the board's files or settings. Each answer is read until the line is quiet for
``serial_idle_s`` after its first byte, until the step's timeout, or until
``serial_step_max_bytes`` (the rest is dropped and counted in the evidence length).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import serial

from cityedge_core import frame
from cityedge_hardware.errors import CollectError
from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.serial_rules import ProbeStep, check_transcript
from cityedge_hardware.verdict import Verdict

POLL_S = 0.05  # seconds one read waits before the deadlines are checked again
HELLO = frame.encode_frame({frame.F_TYPE: frame.T_HELLO, frame.F_ID: 1})

# (name, bytes): everything the probe ever writes, in order.
PROBE_STEPS: tuple[tuple[str, bytes], ...] = (
    ("ctrl-c ctrl-c", b"\x03\x03"),
    ("cr", b"\r"),
    ("ctrl-a (raw REPL)", b"\x01"),
    ("ctrl-b (friendly REPL)", b"\x02"),
    ("hello frame", HELLO),
)


@dataclass(frozen=True)
class SerialResult:
    port: str
    steps: tuple[ProbeStep, ...]
    verdict: Verdict


def _open(port: str, limits: HardwareLimits) -> serial.Serial:
    try:
        line = serial.Serial(port=None, baudrate=limits.serial_baudrate, timeout=POLL_S,
                             write_timeout=limits.serial_step_timeout_s)
        line.port = port
        line.dtr = False  # held low before the port opens: no reset into the bootloader
        line.rts = False
        line.open()
        return line
    except (serial.SerialException, OSError) as e:
        why = os.strerror(e.args[0]) if e.args and isinstance(e.args[0], int) else str(e)
        raise CollectError("cannot open %s: %s" % (port, why)) from e


def _read_answer(line: serial.Serial, timeout_s: float, limits: HardwareLimits) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline or (got and now - quiet_since >= limits.serial_idle_s):
            return bytes(got)
        chunk = line.read(max(1, min(line.in_waiting, 1024)))
        if chunk:
            room = limits.serial_step_max_bytes - len(got)
            got += chunk[:max(0, room)]
            quiet_since = time.monotonic()


def probe(port: str, limits: HardwareLimits = LIMITS) -> SerialResult:
    """Run the probe steps on ``port`` and decide (``CollectError``: the port failed)."""
    line = _open(port, limits)
    steps: list[ProbeStep] = []
    try:
        line.reset_input_buffer()
        for name, data in PROBE_STEPS:
            line.write(data)
            line.flush()
            timeout = (limits.serial_hello_timeout_s if data is HELLO
                       else limits.serial_step_timeout_s)
            steps.append(ProbeStep(name, data, _read_answer(line, timeout, limits)))
    except (serial.SerialException, OSError) as e:
        raise CollectError("the line to %s failed during the probe: %s" % (port, e)) from e
    finally:
        line.close()
    return SerialResult(port, tuple(steps), check_transcript(steps, limits))
