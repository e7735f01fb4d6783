"""The device agent on CPython with a real ring buffer and state file: the stand-in board,
the device's identity and key, and a verifier that reads what the fleet would read.

Shared by the agent tests that need no broker (drops, memory errors, sensor faults).

The agent signs with OpenSSL (``cityedge_host.crypto.EcSigner``) holding the same P-256
key, and the verifier checks with OpenSSL too: these tests are about the agent's
bookkeeping, and the core's pure-Python ES256 took about a second a batch here (the
drop tests ran 100 s each). The core's own signer is what the MicroPython tests and
``tests/core`` use; its signatures and OpenSSL's verify against each other there."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_core import batch as batchmod
from cityedge_core import chain, cose, p256
from cityedge_fw import agent as agentmod
from cityedge_fw import settings, store
from cityedge_host.crypto import EcSigner, EcVerifier, public_sec1
from cityedge_host.verify import make_batch_verifier

DEVICE = "urn:dev:mac:0024befffe804ff1"
KEY = p256.PrivateKey(0xC0FFEE)
KID = cose.kid_for_public_key(KEY.public_key().to_sec1())
SIGNER = EcSigner(ec.derive_private_key(0xC0FFEE, ec.SECP256R1()))  # KEY, in OpenSSL
assert public_sec1(SIGNER.public_key) == KEY.public_key().to_sec1()

Reading = tuple[str, str, Any]


class Sensor:
    """Two readings a sweep; every ninth read is a bus error (a sensor fault)."""

    name = "s"

    def __init__(self) -> None:
        self.n = 0

    def read(self) -> list[Reading]:
        self.n += 1
        if self.n % 9 == 0:
            raise OSError("bus error")
        return [("t", "Cel", 20.5), ("h", "%RH", float(self.n))]


class Board:
    """The HAL as the agent uses it: no trusted clock unless ``unix_time`` says one."""

    name = "test"

    def __init__(self, sensors: Callable[[], Iterable[Any]] | None = None,
                 unix_time: float | None = None) -> None:
        self._sensors = sensors or (lambda: [Sensor()])
        self._unix_time = unix_time

    def unix_time(self) -> float | None:
        return self._unix_time

    def free_heap(self) -> int:
        return 0

    def wdt_feed(self) -> None:
        pass

    def sensors(self, cfg: Any) -> list[Any]:
        return list(self._sensors())


def make_agent(tmp: Path, budget: int = 8192, board: Board | None = None,
               **cfg: Any) -> agentmod.Agent:
    """An agent whose ring buffer and state live under ``tmp`` (a reboot is another call
    with the same ``tmp``)."""
    return agentmod.Agent(board or Board(), DEVICE, SIGNER, KID,
                          store.RingBuffer(str(tmp / "buf"), budget),
                          store.State(str(tmp / "state.cbor")),
                          settings.check({"buffer_budget_bytes": budget, **cfg}),
                          "127.0.0.1", 1)


def fleet_verifier() -> chain.BatchVerifier:
    return make_batch_verifier({KID: chain.KeyEntry(DEVICE, EcVerifier(
        SIGNER.public_key))})


def account(messages: Iterable[bytes], verifier: chain.BatchVerifier | None = None,
            device: str = DEVICE) -> dict[str, int]:
    """What the fleet can tell from signed batches: batches and readings that arrived,
    those the drop records report lost, and the chain's unexplained gaps (``missing``)."""
    verifier = verifier or fleet_verifier()
    out = {"batches": 0, "readings": 0, "lost_batches": 0, "lost_readings": 0, "records": 0,
           "duplicates": 0}
    for data in messages:
        verdict = verifier.check(bytes(data))
        assert verdict.status in (*chain.ACCEPTED, chain.DUPLICATE), verdict
        if verdict.status == chain.DUPLICATE:
            out["duplicates"] += 1
            continue
        b = verdict.batch
        assert b is not None
        out["batches"] += 1
        if b.kind == batchmod.KIND_DROP:
            first, last, batches, readings = b.dropped
            assert first <= last < b.seq
            out["records"] += 1
            out["lost_batches"] += batches
            out["lost_readings"] += readings
        else:
            out["readings"] += len(b.records)
    out["missing"] = verifier.states[device].missing_count() if device in verifier.states \
        else 0
    return out
