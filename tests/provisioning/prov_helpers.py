"""Small helpers for the provisioning tests: a device's ``info``, a scripted UART, a test PKI
made once per session (certificates for a device's CSR and the install fields are in
``support.device_cert``, which the firmware's boot tests use too)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from support.mosquitto import Mosquitto, TestPKI

URN = "urn:dev:mac:0024befffe80aaaa"
INFO = {"model": "ce-sim-1", "serial": "SN-SM", "device": URN, "firmware": "0.1.0"}
_PKI: TestPKI | None = None


def pki() -> TestPKI:
    global _PKI
    if _PKI is None:
        _PKI = TestPKI(Path(tempfile.mkdtemp(prefix="ce-sm-pki-")))
    return _PKI


class FakeUart:
    """A board's UART for ``provision_main.board_boot``: scripted input, captured output."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.out = bytearray()

    def read(self, n: int) -> bytes | None:
        chunk, self.data = self.data[:n], self.data[n:]
        if not chunk:
            raise AssertionError("board_boot read past the script: it should have returned")
        return chunk

    def write(self, b: bytes) -> int:
        self.out.extend(b)
        return len(b)


def broker_port(broker: Mosquitto | None) -> int:
    if broker is not None:
        return broker.port
    from support.mosquitto import free_port

    return free_port()  # nothing listens there: "broker down"
