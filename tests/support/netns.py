"""Hosts of their own on one machine, for tests of what crosses a network: each host a
network namespace (``ip netns``, Debian's iproute2) with one address, all on one bridge
that the test's own namespace also sits on, so the test, its devices and its workers reach
every host, and the hosts reach each other.

``partition(side_a, side_b)`` cuts the hosts of one side off from the other's: a
``blackhole`` route to each address of the other side, in each host's namespace.
Packets between the sides vanish (open TCP connections see silence, not a reset, as
when a switch or a fibre between two racks fails), while both sides still reach the
test's namespace and it reaches them. ``heal()`` removes the routes. No packet filter is
needed (this machine's kernel has no ``netem`` and no ``iptables`` here).

Everything is named after this process (``ce<pid>``) and removed by ``close()``; what a
killed run left (its pid gone) is removed by the next ``Hosts``. Needs root, as the tests
run here; a machine where ``ip netns add`` fails fails the test that asked for hosts.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "ce"  # every name: ce<pid hex>...


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError("ip %s: %s" % (" ".join(args), out.stderr.strip()))
    return out


def _alive(pid: int) -> bool:
    return Path("/proc/%d" % pid).exists()


def remove_strays() -> list[str]:
    """Namespaces and bridges a run whose process is gone left behind (names
    ``ce<pid hex>-...``); what was removed."""
    gone = []
    for ns in sorted(NETNS_DIR.glob(PREFIX + "*-h*")) if NETNS_DIR.exists() else []:
        pid = ns.name[len(PREFIX):].split("-")[0].split("x")[0]
        if all(c in "0123456789abcdef" for c in pid) and pid and not _alive(int(pid, 16)):
            _ip("netns", "del", ns.name, check=False)
            gone.append(ns.name)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX + "br"):
            pid = name[len(PREFIX) + 2:].split("x")[0]
            if pid and all(c in "0123456789abcdef" for c in pid) and not _alive(int(pid, 16)):
                _ip("link", "del", name, check=False)
                gone.append(name)
    return gone


class Hosts:
    """``count`` hosts ``10.213.<n>.1 .. count`` on a bridge whose own address (the
    test's side) is ``10.213.<n>.254``."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= 9:
            raise ValueError("1 to 9 hosts")
        if os.geteuid() != 0:
            raise RuntimeError("hosts of their own need root (ip netns add): run the suite "
                               "as root, as CI does")
        remove_strays()
        pid = "%x" % os.getpid()
        tag = "%sx%s" % (pid, secrets.token_hex(1))  # several Hosts in one process
        self.bridge = "%sbr%s" % (PREFIX, tag)  # at most 15 characters: ce br 6 x 2
        self.namespaces = ["%s%s-h%d" % (PREFIX, tag, i + 1) for i in range(count)]
        self.subnet = self._free_subnet()
        self.addresses = ["10.213.%d.%d" % (self.subnet, i + 1) for i in range(count)]
        self.gateway = "10.213.%d.254" % self.subnet
        self.cut: list[tuple[int, int]] = []  # (host, host it cannot reach)
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> int:
        used = _ip("-o", "-4", "addr", "show").stdout
        for _ in range(100):
            n = secrets.randbelow(250)
            if " 10.213.%d." % n not in used:
                return n
        raise RuntimeError("no free 10.213.x.0/24 on this machine")

    def _build(self, tag: str) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", self.gateway + "/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            outside, inside = "%sv%s%d" % (PREFIX, tag, i + 1), "eth0"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", self.addresses[i] + "/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run on host ``i`` (in its namespace; the same process, so its pid and
        process group are the command's own)."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def partition(self, side_a: list[int], side_b: list[int]) -> None:
        """No packet between a host of ``side_a`` and one of ``side_b``, either way."""
        for a in side_a:
            for b in side_b:
                for src, dst in ((a, b), (b, a)):
                    _ip("-n", self.namespaces[src], "route", "add", "blackhole",
                        self.addresses[dst] + "/32")
                    self.cut.append((src, dst))

    def heal(self) -> None:
        """Every host reaches every other again (the partitions' routes removed)."""
        while self.cut:
            src, dst = self.cut.pop()
            _ip("-n", self.namespaces[src], "route", "del", "blackhole",
                self.addresses[dst] + "/32", check=False)

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)  # its end of the veth goes with it
        _ip("link", "del", self.bridge, check=False)
