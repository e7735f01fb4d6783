"""``cityedge_host.ports.free_port``: below the kernel's ephemeral range (never a port the
kernel may give an outgoing connection meanwhile), free, and never one a server holds."""

from __future__ import annotations

import socket

import pytest

from cityedge_host import ports


def test_a_free_port_is_below_the_ephemeral_range_and_a_server_can_bind_it() -> None:
    for _ in range(20):
        port = ports.free_port()
        assert ports._EPHEMERAL_LOW - ports.BELOW_RANGE <= port < ports._EPHEMERAL_LOW
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_a_port_a_server_listens_on_is_never_handed_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    free = ports.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports.free_port()))
        held.listen()
        busy = held.getsockname()[1]
        assert busy != free
        picks = iter([busy, busy, free])  # the random picks: the held port twice, then free
        monkeypatch.setattr(ports._PICK, "randrange", lambda _lo, _hi: next(picks))
        assert ports.free_port() == free
