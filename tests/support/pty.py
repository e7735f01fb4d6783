"""A pseudo-terminal pair standing in for a serial cable (tests of the gateway's serial
inputs: the gateway opens ``link``, the test writes the sensor's side)."""

from __future__ import annotations

import os
import tty
from pathlib import Path


class Pty:
    """A pty pair; the gateway opens ``link`` (a symlink, like /dev/serial/by-id/...)."""

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        self.link = link
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(self.slave))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        self.link.unlink(missing_ok=True)
        os.close(self.master)
        os.close(self.slave)


class Sds011Stream:
    """An SDS011 sensor on a ``Pty``: a measurement frame every ``every_s`` from a thread
    (values 1, 2, 3 ... tenths of a µg/m³), while the gateway may come and go: a frame the
    pty cannot take (no reader, its buffer full) is counted in ``dropped``, not blocked on."""

    def __init__(self, link: Path, every_s: float = 0.2) -> None:
        import threading

        self.pty = Pty(link)
        os.set_blocking(self.pty.master, False)
        self.every_s = every_s
        self.sent = self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sds011Stream:
        self._thread.start()
        return self

    def _run(self) -> None:
        from cityedge_gateway.sds011 import encode_frame

        n = 0
        while not self._stop.wait(self.every_s):
            n += 1
            try:
                self.pty.write(encode_frame(n % 1000, 2 * n % 1000))
                self.sent += 1
            except (BlockingIOError, OSError):
                self.dropped += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.pty.unplug()
