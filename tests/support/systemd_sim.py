"""systemd's part in an update, played by the test: a unit file's ``ExecStartPre`` and
``ExecStart`` run as systemd runs them, and ``Restart=on-failure`` obeyed.

``ServiceSim(unit, paths)`` reads the ``[Service]`` section of the real unit file
(``gateway/cityedge-gateway.service``), replaces the production paths by the test's
(``paths``: ``{"/opt/cityedge": root, "/etc/cityedge/gateway.toml": config}``) and, once
started, loops in a thread: each ``ExecStartPre`` (a ``-`` prefix ignores its failure,
a missing program included, as systemd does), then ``ExecStart``; when the main process
exits non-zero it starts again (``RestartSec`` is not waited: nothing here depends on it),
up to ``max_starts``. ``exits`` lists the main process's exit codes in order. Output of
every process goes to ``log``.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
from pathlib import Path

from support.procs import stop as stop_process


class ServiceSim:
    def __init__(self, unit: Path, paths: dict[str, str], log: Path,
                 max_starts: int = 8) -> None:
        self.pre: list[str] = []
        self.main = ""
        self.restart = "no"
        section = ""
        for raw in unit.read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            if section != "[Service]" or "=" not in line or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            for old, new in paths.items():
                value = value.replace(old, new)
            if key == "ExecStartPre":
                self.pre.append(value)
            elif key == "ExecStart":
                self.main = value
            elif key == "Restart":
                self.restart = value
        assert self.main, "the unit has no ExecStart"
        self.log = log
        self.max_starts = max_starts
        self.exits: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a start and a stop never cross
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> ServiceSim:
        self._thread.start()
        return self

    def _run_pre(self, out: object) -> None:
        for cmd in self.pre:
            ignore = cmd.startswith("-")
            argv = shlex.split(cmd.lstrip("-"))
            try:
                rc = subprocess.run(argv, stdout=out, stderr=out, timeout=60).returncode  # type: ignore[arg-type]
            except FileNotFoundError:
                rc = 203  # systemd's EXIT_EXEC
            if rc and not ignore:
                raise RuntimeError("ExecStartPre %s failed with %d" % (cmd, rc))

    def _loop(self) -> None:
        with self.log.open("ab") as out:
            for _ in range(self.max_starts):
                if self._stopping.is_set():
                    return
                self._run_pre(out)
                with self._lock:
                    if self._stopping.is_set():
                        return
                    proc = self.proc = subprocess.Popen(shlex.split(self.main), stdout=out,
                                                        stderr=out)
                rc = proc.wait()
                if self._stopping.is_set():
                    return
                self.exits.append(rc)
                if rc == 0 or self.restart not in ("on-failure", "always"):
                    return

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None:
            stop_process(proc)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the service loop did not end"
