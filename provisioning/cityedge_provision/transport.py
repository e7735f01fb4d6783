"""The serial link to a device in provisioning mode: framed requests, replies, timeouts.

``SerialTransport`` opens the port lazily (``ensure_connected()``, safe to call twice),
numbers each request (``F_ID``) and waits for the reply with the same number, so a stale
reply or line noise never answers the wrong request. Faults become host errors:

- the port cannot be opened, the line drops (USB unplugged, pty closed), or the device
  stays silent past the step's timeout: ``LinkError`` (local; re-run resumes);
- the device says a frame it got was corrupted (garbage, CRC, oversize), or a frame from
  the device arrives corrupted: the request is sent again after a short grace period
  (``RESEND_GRACE_S``) in which the real reply may still come, at most ``frame_retries``
  times, then ``LinkError``. Every step is safe to repeat;
- the device answers the request with an error frame: ``DeviceRefused`` (or
  ``DeviceAlreadyProvisioned`` for ``E_LOCKED``).

``list_ports()`` lists candidate ports with their USB vendor/product ids where known.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import serial
from serial.tools import list_ports as _list_ports

from cityedge_core import frame
from cityedge_provision.errors import DeviceAlreadyProvisioned, DeviceRefused, LinkError
from cityedge_provision.limits import LIMITS, ProvisionLimits

POLL_S = 0.05  # seconds one read waits before the deadline is checked again
RESEND_GRACE_S = 0.5  # seconds to wait for a reply after a corrupted-frame report
FRAMING_CODES = (frame.E_GARBAGE, frame.E_CRC, frame.E_OVERSIZE, frame.E_MALFORMED)

# USB bridges the city's gateway models use; others are listed too, marked unknown.
KNOWN_USB = {
    (0x10C4, 0xEA60): "Silicon Labs CP210x (ESP32 DevKit)",
    (0x1A86, 0x7523): "WCH CH340 (ESP32 boards)",
    (0x1A86, 0x55D4): "WCH CH9102 (ESP32 boards)",
    (0x303A, 0x1001): "Espressif USB JTAG/serial (ESP32-S3/C3)",
    (0x2E8A, 0x0005): "Raspberry Pi Pico W (MicroPython)",
    (0x0403, 0x6001): "FTDI FT232R",
}


@dataclass(frozen=True)
class PortInfo:
    device: str
    vid: int | None
    pid: int | None
    description: str

    @property
    def known(self) -> str | None:
        if self.vid is None or self.pid is None:
            return None
        return KNOWN_USB.get((self.vid, self.pid))

    def label(self) -> str:
        ids = "%04x:%04x" % (self.vid, self.pid) if self.vid is not None and \
            self.pid is not None else "no USB id"
        return "%s  (%s, %s)" % (self.device, ids, self.known or self.description or "unknown")


def list_ports() -> list[PortInfo]:
    """Serial ports, the ones with a known USB bridge first."""
    ports = [PortInfo(p.device, p.vid, p.pid, p.description or "")
             for p in _list_ports.comports()]
    return sorted(ports, key=lambda p: (p.known is None, p.vid is None, p.device))


class Line(Protocol):
    """What the transport needs of a port (``serial.Serial`` has it)."""

    def write(self, data: bytes) -> int | None: ...
    def read(self, size: int = 1) -> bytes: ...
    def close(self) -> None: ...
    def reset_input_buffer(self) -> None: ...

    @property
    def in_waiting(self) -> int: ...


class SerialTransport:
    """One device on one serial port (see the module docstring)."""

    def __init__(self, port: str, limits: ProvisionLimits = LIMITS) -> None:
        self.port = port
        self.limits = limits
        self._line: Line | None = None
        self._decoder = frame.FrameDecoder()
        self._next_id = 1
        self.retries = 0  # requests sent again after a corrupted-frame report

    def _open(self) -> Line:
        try:
            line: Line = serial.Serial(self.port, self.limits.baudrate, timeout=POLL_S,
                                       write_timeout=self.limits.reply_timeout_s)
            return line
        except (serial.SerialException, OSError) as e:
            why = os.strerror(e.args[0]) if e.args and isinstance(e.args[0], int) else str(e)
            raise LinkError("cannot open %s: %s" % (self.port, why),
                            "check the port name (`cityedge provision ports`) and that no "
                            "other program (a serial monitor) holds it") from e

    def ensure_connected(self) -> None:
        """Open the port if it is not open; drop stale input. Safe to call again."""
        if self._line is None:
            self._line = self._open()
            self._decoder.reset()
            self._drain()

    def close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                line.close()

    def __enter__(self) -> SerialTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        line = self._line
        if line is None:
            return
        try:
            line.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as e:
            self.close()
            raise LinkError("the serial line to the device was lost: %s" % e) from e

    def _lost(self, e: Exception) -> LinkError:
        self.close()
        return LinkError("the serial line to the device was lost (%s)" % e,
                         "check the cable; nothing half-done stays on the device: run the "
                         "same command again to resume")

    def request(self, msg_type: int, fields: dict[int, Any] | None = None,
                timeout_s: float | None = None) -> dict[int, Any]:
        """Send one request and return the device's reply (see the module docstring)."""
        step = frame.TYPE_NAMES.get(msg_type, str(msg_type))
        timeout = timeout_s if timeout_s is not None else self.limits.reply_timeout_s
        for _attempt in range(self.limits.frame_retries + 1):
            reply = self._exchange(msg_type, fields or {}, step, timeout)
            if reply is not None:
                return reply
            self.retries += 1
        raise LinkError("the device kept reporting corrupted frames for %s" % step,
                        "the line is noisy: try another cable or USB port")

    def _exchange(self, msg_type: int, fields: dict[int, Any], step: str,
                  timeout: float) -> dict[int, Any] | None:
        self.ensure_connected()
        line = self._line
        assert line is not None
        rid = self._next_id
        self._next_id += 1
        msg = dict(fields)
        msg[frame.F_TYPE] = msg_type
        msg[frame.F_ID] = rid
        resend_at: float | None = None  # set when the device reports a corrupted frame
        try:
            line.write(frame.encode_frame(msg))
        except (serial.SerialException, OSError) as e:
            raise self._lost(e) from e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if resend_at is not None and time.monotonic() >= resend_at:
                return None
            try:
                data = line.read(max(1, min(line.in_waiting, self.limits.read_chunk_bytes)))
            except (serial.SerialException, OSError, TypeError) as e:
                raise self._lost(e) from e
            if not data:
                continue
            for item in self._decoder.feed(data):
                if isinstance(item, frame.FrameError):
                    # a frame corrupted on its way to us (perhaps our reply, perhaps
                    # noise): if our reply does not follow soon, ask again
                    if resend_at is None:
                        resend_at = time.monotonic() + RESEND_GRACE_S
                    continue
                if item.get(frame.F_ID) != rid:
                    # a framing error: perhaps our request arrived corrupted, perhaps it
                    # was noise before it: wait briefly for our reply, then send it again
                    if resend_at is None and item.get(frame.F_TYPE) == frame.T_ERROR \
                            and item.get(frame.F_ID) is None \
                            and item.get(frame.F_CODE) in FRAMING_CODES:
                        resend_at = time.monotonic() + RESEND_GRACE_S
                    continue  # a stale reply to an earlier request
                if item.get(frame.F_TYPE) == frame.T_ERROR:
                    err = frame.as_error(item)
                    cls = DeviceAlreadyProvisioned if err.code == frame.E_LOCKED \
                        else DeviceRefused
                    raise cls(step, err.code, err.message)
                reply: dict[int, Any] = item
                return reply
        self._decoder.reset()
        raise LinkError("the device did not answer %s within %.0f s" % (step, timeout),
                        "is this the device's port, and is the device in provisioning mode "
                        "(unprovisioned, or unlocked)? Power-cycle it and run again")
