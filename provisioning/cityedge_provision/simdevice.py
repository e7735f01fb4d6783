"""A simulated device in provisioning mode: the real firmware on the MicroPython unix port,
its UART on a pseudo-terminal, so ``cityedge provision --port <pty>`` (and ``make demo``,
and the tests) provision it exactly as they would a board on ``/dev/ttyUSB0``.

The device process holds the pty's master side as its stdin/stdout; the technician's tool
opens the slave side (``SimulatedDevice.port``) with pyserial. The firmware runs from .mpy
compiled by ``cityedge_host.mpy``, as on a board. Its files (key, certificate, config) live in
``root``, the simulated flash; ``kill()`` is the cable pulled. With ``claim``, the device
left the factory with that claim secret in its flash (``claim.txt``, as a vendor writes it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".venv" / "bin" / "micropython"
# bytes of MicroPython heap. The unix port keeps the bytecode on the heap (~85 KB for the
# provisioning mode, the MQTT client and the core; a board freezes it into flash); the
# rest covers the TLS handshake of the self-test (measured: 57 KB free before it at 160k)
# and, for a device holding an offline ticket, its enrollment POST: 72 KB free before it
# at 192k on a fresh boot; at 160k, after a few failed attempts, the heap was too
# fragmented for the reply (MemoryError, retried forever).
HEAP = "192k"

RUN = """
import sys
sys.path.insert(0, %r)
from cityedge_fw import provision_main
provision_main.main(%r)
"""


def compile_firmware(dest: Path) -> Path:
    """The core and the device firmware as .mpy under ``dest`` (put it on sys.path)."""
    from cityedge_host.mpy import compile_package

    compile_package(ROOT / "firmware" / "cityedge_core", dest)
    compile_package(ROOT / "firmware" / "cityedge_fw", dest)
    return dest


class SimulatedDevice:
    """One device: files under ``root``, UART on a pty (see the module docstring)."""

    def __init__(self, root: Path, mpy_dir: Path, serial: str, device: str,
                 model: str = "ce-sim-1", heap: str = HEAP,
                 micropython: Path = MICROPYTHON, claim: str | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        if claim is not None:  # the vendor's factory step
            (self.root / "claim.txt").write_text(claim)
        self.mpy_dir = mpy_dir
        self.serial = serial
        self.device = device
        self.model = model
        self.heap = heap
        self.micropython = micropython
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = ""
        self._slave: int | None = None
        self.log = root.parent / ("%s.log" % root.name)

    def start(self) -> SimulatedDevice:
        master, slave = os.openpty()
        tty.setraw(slave)
        argv = ["provision_main", "--root", str(self.root), "--serial", self.serial,
                "--device", self.device, "--model", self.model]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.micropython), "-X", "heapsize=" + self.heap, "-c",
                 RUN % (str(self.mpy_dir), argv)],
                stdin=master, stdout=master, stderr=log, cwd=ROOT)
        os.close(master)  # only the device holds the master: closing it = cable pulled
        self._slave = slave  # kept open so the line stays up while the tool reopens it
        self.port = os.ttyname(slave)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Pull the cable: the device process dies and its side of the pty closes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()
        if self._slave is not None:
            with contextlib.suppress(OSError):
                os.close(self._slave)
            self._slave = None

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
