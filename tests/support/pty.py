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
