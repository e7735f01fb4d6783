"""systemd's service notification protocol (``sd_notify(3)``), for ``Type=notify`` units.

A service tells systemd that it is ready (``READY=1``), what it is doing (``STATUS=...``),
that it is alive (``WATCHDOG=1``, at least every ``WatchdogSec=``: else systemd kills and
restarts it) and that it is stopping (``STOPPING=1``), by sending datagrams to the
``AF_UNIX`` socket named in ``NOTIFY_SOCKET`` (a leading ``@`` is Linux's abstract
namespace). Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing, so the same
code runs under a terminal, a test or a unit.

Written here rather than taken from PyPI: the protocol is one ``sendto`` of a text, the
packages that offer it either need libsystemd's headers to build (systemd-python) or are
unmaintained (sdnotify), and the gateway must install on a Pi without a compiler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines); True if systemd was told."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:  # a notification lost must not stop the service
        log.warning("sd_notify %r: %s", state.split("=", 1)[0], e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None when
    systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (the one that started us)
    return int(usec) / 2e6


async def watchdog(healthy: Callable[[], bool] = lambda: True) -> None:
    """Ping systemd's watchdog for as long as the event loop runs and ``healthy()``; a
    loop that hangs, or a service that is not healthy, stops the pings and systemd
    restarts it. Returns at once when there is no watchdog."""
    every = watchdog_interval()
    if every is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(every)


class Pinger:
    """The watchdog for a service whose work runs in a thread: ``pet()`` from that
    thread's loop sends ``WATCHDOG=1`` at most once per interval, so the pings stop when
    the loop stops turning (a hang, a deadlock) and systemd restarts the service."""

    def __init__(self) -> None:
        self.every = watchdog_interval()
        self._last = 0.0

    def pet(self) -> None:
        if self.every is None:
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            notify("WATCHDOG=1")
