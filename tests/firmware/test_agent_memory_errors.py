"""MemoryErrors the agent survives (on CPython, the MemoryError injected), each counted in
``mem_errors`` (status): a command whose decoders find no room is checked again by the
forwarder and obeyed once, or dropped with a reason after ``_COMMAND_TRIES``; a batch
whose signature finds no room keeps its records and is signed at the next reading, the
chain unbroken; a status with no room is skipped."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from cityedge_core import command, cose, p256
from cityedge_core import command_gate as commands
from cityedge_core.batch import Batch
from cityedge_fw import agent as agentmod
from cityedge_fw import mqtt, settings, store

from support.firmware_agent import DEVICE, KID, SIGNER, Board
from support.ring_reader import oldest

FLEET = p256.PrivateKey(0xF1EE7)
FLEET_KID = cose.kid_for_public_key(FLEET.public_key().to_sec1())


class Clock:
    """The agent's millisecond clock, moved by hand."""

    def __init__(self) -> None:
        self.ms = 1000

    def __call__(self) -> int:
        return self.ms


def make_agent(tmp: Path) -> agentmod.Agent:
    a = agentmod.Agent(Board(), DEVICE, SIGNER, KID, store.RingBuffer(str(tmp / "buf"), 8192),
                       store.State(str(tmp / "state.cbor")),
                       settings.check({"batch_readings": 10}), "127.0.0.1", 1,
                       fleet_keys={FLEET_KID: FLEET.public_key()})
    a.link.clock = Clock()
    a.board.unix_time = lambda: int(time.time())  # type: ignore[method-assign]
    return a


def later(a: agentmod.Agent, ms: int) -> None:
    a.link.clock.ms += ms  # type: ignore[attr-defined]


def fails_first(real: Any, times: int) -> Any:
    """``real``, except that its first ``times`` calls run out of memory."""
    left = [times]

    def call(*args: Any, **kw: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise MemoryError("memory allocation failed, allocating 66 bytes")
        return real(*args, **kw)

    return call


def connected(a: agentmod.Agent, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The agent's link up as far as publishing goes; returns what it publishes."""
    a.link.client.state = mqtt.CONNECTED
    sent: list[tuple[str, Any]] = []

    async def publish(topic: str, data: Any, qos: int) -> None:
        sent.append((topic, data))

    monkeypatch.setattr(a.link, "publish", publish)
    return sent


def desired(seq: int, batch_readings: int) -> bytes:
    return command.encode_command(FLEET, FLEET_KID, "desired", DEVICE, seq,
                                   int(time.time()) + 600, {"batch_readings": batch_readings})


@pytest.fixture
def full_heap(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``fail[0]``: how many of the next checks run out of memory."""
    fail = [0]
    real = commands.CommandGate.check

    def check(self: Any, data: bytes) -> Any:
        if fail[0]:
            fail[0] -= 1
            raise MemoryError("memory allocation failed, allocating 272 bytes")
        return real(self, data)

    monkeypatch.setattr(commands.CommandGate, "check", check)
    return fail


def test_command_without_heap_is_retried_and_obeyed_once(tmp_path: Path,
                                                          full_heap: list[int]) -> None:
    a = make_agent(tmp_path)
    full_heap[0] = 1
    assert asyncio.run(a.handle_command(desired(1, 4))) is None
    assert (a.mem_errors, a.commands_accepted, a.cfg["batch_readings"]) == (1, 0, 10)
    assert a._fwd is None  # let go for the decoders
    asyncio.run(a.forward_once())  # too soon: the heap has not changed yet
    assert a.commands_accepted == 0 and a._deferred
    later(a, agentmod._RETRY_MS)
    asyncio.run(a.forward_once())  # the forwarder's next round tries again
    assert (a.mem_errors, a.commands_accepted, a.cfg["batch_readings"]) == (1, 1, 4)
    assert a.state.get("cmd_seq") == 1 and not a._deferred
    asyncio.run(a.forward_once())  # nothing left to retry: not obeyed twice
    assert a.commands_accepted == 1


def test_command_is_dropped_with_a_reason_after_the_last_try(tmp_path: Path,
                                                             full_heap: list[int]) -> None:
    a = make_agent(tmp_path)
    full_heap[0] = agentmod._COMMAND_TRIES
    asyncio.run(a.handle_command(desired(1, 4)))
    for tries in range(1, agentmod._COMMAND_TRIES + 1):
        later(a, agentmod._RETRY_MS * tries)  # each wait longer than the one before
        asyncio.run(a.forward_once())
    assert a.mem_errors == agentmod._COMMAND_TRIES
    assert a.commands_accepted == 0 and a.cfg["batch_readings"] == 10
    assert a.last_error == "command dropped: no heap to check it"
    assert cbor2.loads(a.status_cbor())["mem_errors"] == agentmod._COMMAND_TRIES
    # the heap has room again: the next command goes through as usual
    asyncio.run(a.handle_command(desired(2, 6)))
    assert a.commands_accepted == 1 and a.cfg["batch_readings"] == 6


def test_at_most_two_commands_wait(tmp_path: Path, full_heap: list[int]) -> None:
    a = make_agent(tmp_path)
    full_heap[0] = 3
    for seq in (1, 2, 3):
        asyncio.run(a.handle_command(desired(seq, 4 + seq)))
    assert len(a._deferred) == agentmod._DEFERRED_MAX and a.mem_errors == 3
    assert a.last_error == "command dropped: no heap to check it"
    later(a, agentmod._RETRY_MS)
    asyncio.run(a.forward_once())
    later(a, agentmod._RETRY_MS)
    asyncio.run(a.forward_once())
    assert a.commands_accepted == 2 and a.cfg["batch_readings"] == 6  # seq 1, then seq 2


def test_batch_without_heap_to_sign_keeps_its_records_and_the_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_agent(tmp_path)
    monkeypatch.setattr(a.writer, "sign_chunks", fails_first(a.writer.sign_chunks, 1))
    while a.records.count < 10:  # one sensor, two readings a sweep: batch_readings 10
        a.sweep()
    assert (a.mem_errors, a.batches_signed, a.records.count, a.writer.seq) == (1, 0, 10, 0)
    a.sweep()  # its first reading makes 11: signed now, every record kept; the 2nd is next
    assert (a.mem_errors, a.batches_signed, a.records.count, a.writer.seq) == (1, 1, 1, 1)
    [(seq, data)] = oldest(a.store, 5)
    batch = Batch.decode(cose.decode_sign1(data).payload)
    assert seq == 1 and len(batch.records) == 11
    assert batch.prev == bytes(32)  # the failed try did not move the chain


def test_status_without_heap_is_skipped_and_counted(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_agent(tmp_path)
    sent = connected(a, monkeypatch)
    monkeypatch.setattr(cose, "sign1_chunks", fails_first(cose.sign1_chunks, 1))
    assert asyncio.run(a.publish_status()) is False
    assert a.mem_errors == 1 and not sent
    assert asyncio.run(a.publish_status()) is True
    msg = cose.decode_sign1(b"".join(sent[0][1]))  # sent as chunks, never joined
    assert cbor2.loads(msg.payload)["mem_errors"] == 1


def test_status_command_without_heap_is_sent_later(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_agent(tmp_path)
    sent = connected(a, monkeypatch)
    status = command.encode_command(FLEET, FLEET_KID, "status", DEVICE, 1,
                                     int(time.time()) + 600)
    monkeypatch.setattr(cose, "sign1_chunks", fails_first(cose.sign1_chunks, 1))
    assert asyncio.run(a.handle_command(status)) == "status"
    # the command is answered at once (its signed result); the status waits for room
    assert a.commands_accepted == 1 and a.mem_errors == 1
    assert [t for t, _ in sent] == ["ce/v1/%s/up/result" % DEVICE]
    later(a, agentmod._RETRY_MS)
    asyncio.run(a.forward_once())
    assert [t for t, _ in sent] == ["ce/v1/%s/up/result" % DEVICE,
                                    "ce/v1/%s/up/status" % DEVICE] and not a._deferred


def test_no_heap_to_sign_for_long_skips_sweeps_instead_of_growing_the_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readings wait in the records buffer while signatures find no room, up to its
    headroom; after that sweeps are skipped (no new block for a bigger buffer in a heap
    that has none), the watchdog sees the sampler late, and nothing taken is lost."""
    a = make_agent(tmp_path)

    def no_heap(*args: Any, **kw: Any) -> Any:
        raise MemoryError("memory allocation failed, allocating 66 bytes")

    monkeypatch.setattr(a.writer, "sign_chunks", no_heap)
    allocated = len(a.records.data)
    taken = [a.sweep() for _ in range(20)]
    assert taken[-5:] == [0] * 5 and a.records.count == sum(taken)
    assert len(a.records.data) == allocated and a.batches_signed == 0
    a.last_sweep_ms -= 10 * a.cfg["sample_interval_s"] * 1000  # as if the skips took time
    assert not a.healthy()  # so the watchdog is starved: the board resets
    monkeypatch.undo()
    a.sweep()  # room again: everything taken is signed, the sweep goes on
    assert a.batches_signed == 1
    [(_seq, data)] = oldest(a.store, 5)
    assert len(Batch.decode(cose.decode_sign1(data).payload).records) == sum(taken)
