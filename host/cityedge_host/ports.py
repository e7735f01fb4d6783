"""A free loopback TCP port for a server started later (the demo's services, the tests'
brokers and databases): the one home of the rule below."""

from __future__ import annotations

import random
import socket
from pathlib import Path

PICK_TRIES = 256  # random ports tried below the ephemeral range before the kernel's choice
BELOW_RANGE = 12000  # how far below the ephemeral range's start ports are picked
_PICK = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default start of the range


_EPHEMERAL_LOW = _ephemeral_low()


def free_port() -> int:
    """A loopback TCP port nothing listens on, for a server started later.

    Taken at random from below the kernel's ephemeral range (``ip_local_port_range``),
    not from it: a port the kernel hands out for ``bind(0)`` is one it may also give any
    outgoing connection as its local port before our server binds it, and on a busy
    machine (RabbitMQ's nodes, brokers, databases, clients in another test worker) that
    race was lost now and then (RabbitMQ's ``dist_port_already_used``). Below the range,
    only another caller's choice can collide, and the bind check here catches a
    listener."""
    high = _EPHEMERAL_LOW
    low = max(1024, high - BELOW_RANGE)
    for _ in range(PICK_TRIES):
        port = _PICK.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that range is full: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
