"""Fast devices (``cityedge.fastdevice``) in a process of their own: one asyncio loop for
hundreds of them, beside the fleet rather than inside it (a fleet in the test's process
and a thousand devices in one loop of that same process share one interpreter lock, and
the campaign measures the devices' share as the fleet's).

``Swarm(dirs, port, ...)`` starts ``python tests/support/fastswarm.py SPEC`` with the
device directories (each made by ``fastdevice.provision``); the devices connect spread
over ``stagger_s`` (no handshake storm at the broker) and run until ``stop()``, which
sends SIGTERM, waits for them to end their sessions and returns each device's
``FastStats`` (as a dict), the kids of the keys left on its disk and the current one.
The child raises its own descriptor limit to the hard one (a TLS connection each)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STOP_S = 120.0  # seconds the devices get to end their sessions and write their stats


class Swarm:
    """The devices of ``dirs`` in a child process (module docstring)."""

    def __init__(self, dirs: list[Path], port: int, *, interval_s: float = 5.0,
                 stagger_s: float = 0.0, prove_at_once: bool = True) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="cityedge-swarm-"))
        self.spec = self.work / "spec.json"
        self.out = self.work / "stats.json"
        self.log = self.work / "swarm.log"
        self.spec.write_text(json.dumps({
            "dirs": [str(d) for d in dirs], "host": "127.0.0.1", "port": port,
            "interval_s": interval_s, "stagger_s": stagger_s,
            "prove_at_once": prove_at_once, "out": str(self.out)}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Swarm:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, str(self.spec)],
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stop the devices; each one's stats and key slots, by device id."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("the swarm did not stop: %s" % self.tail()) from None
        assert self.proc.returncode == 0, self.tail()
        stats = dict(json.loads(self.out.read_text()))
        shutil.rmtree(self.work, ignore_errors=True)
        return stats

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return ""


def raise_fd_limit(need: int = 0) -> int:
    """The soft limit of open descriptors up to the hard one (each TLS connection is one,
    here and at the broker, which inherits the limit of the process that starts it); the
    limit now. ``need``: AssertionError if even the hard limit is below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert soft >= need, "RLIMIT_NOFILE is %d: %d descriptors are needed" % (soft, need)
    return soft


async def _run(spec: dict[str, Any]) -> None:
    from cityedge.fastdevice import FastDevice

    dirs = [Path(d) for d in spec["dirs"]]
    devices = [FastDevice(d, spec["host"], spec["port"], interval_s=spec["interval_s"],
                          prove_at_once=spec["prove_at_once"]) for d in dirs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    step = spec["stagger_s"] / max(1, len(devices))

    async def one(device: FastDevice, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if not stop.is_set():
            await device.run()

    tasks = [asyncio.create_task(one(d, i * step)) for i, d in enumerate(devices)]
    await stop.wait()
    for d in devices:
        d.stop()
    await asyncio.gather(*tasks)
    out = {d.id: {**dataclasses.asdict(d.stats), "slots": d.key_slots(),
                  "kid": d.signer.kid.hex(), "outbox": len(d.outbox)} for d in devices}
    Path(spec["out"]).write_text(json.dumps(out))


def main(argv: list[str]) -> int:
    raise_fd_limit()
    spec = json.loads(Path(argv[1]).read_text())
    asyncio.run(_run(spec))
    return 0


if __name__ == "__main__":
    for p in (ROOT, ROOT / "tests"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv))
