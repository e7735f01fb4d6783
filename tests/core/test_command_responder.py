"""The CPython command responder (``cityedge_host.command_responder``) as a hypothesis
state machine: any mix of genuine, repeated, forged, foreign and expired commands, in any
order. A command runs at most once, only when genuine and new; a repeat gets the answer
it got the first time, byte for byte (while kept); nothing forged or foreign is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cityedge_core import command, command_decode
from cityedge_host.command_responder import (
    ANSWERS_KEPT,
    CommandResponder,
    Done,
    Later,
    Refuse,
)
from cityedge_host.crypto import EcSigner

from support.commands import MemState

DEVICE = "urn:dev:mac:b827ebfffe000001"
OTHER = "urn:dev:mac:b827ebfffe000002"
FLEET = EcSigner.generate()
ROGUE = EcSigner.generate()
ME = EcSigner.generate()
NOW = 1_800_000_000


class Responder(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ran: list[int] = []  # seqs whose handler ran, in order
        self.state = MemState()
        self.responder = self._responder()
        self.taken = 0  # the highest seq the responder took
        self.first: dict[int, bytes] = {}  # seq -> its first answer
        self.answered_order: list[int] = []  # seqs answered (kept), oldest first

    def _responder(self) -> CommandResponder:
        async def work(args: Any) -> Done:
            seq = args["seq"]
            self.ran.append(seq)
            if seq % 5 == 0:
                raise Refuse("declined")
            if seq % 7 == 0:
                raise OSError("the sensor bus is down")
            return Done("done %d" % seq, {"seq": seq})

        return CommandResponder(DEVICE, ME, ME.kid, {FLEET.kid: FLEET.verifier()}, self.state,
                                {"work": work}, clock=lambda: NOW)

    def _send(self, data: bytes) -> bytes | None:
        return asyncio.run(self.responder.answer(data))

    def _check_repeat(self, seq: int, answer: bytes, ran_before: int) -> None:
        assert len(self.ran) == ran_before  # a repeat never runs again
        kept = self.answered_order[-ANSWERS_KEPT:]
        outcome = command_decode.decode_result(answer, ME.verifier()).outcome
        if seq in kept:
            assert answer == self.first[seq]  # the same signed bytes again
        elif seq not in self.first and seq > kept[0]:
            assert outcome == command.REFUSED  # never taken: a later one was taken first
        else:  # older than every seq kept
            assert outcome == command.FAILED

    def _record(self, seq: int, answer: bytes) -> None:
        self.taken = seq
        self.first[seq] = answer
        self.answered_order.append(seq)

    @rule(seq=st.integers(1, 20))
    def genuine(self, seq: int) -> None:
        ran_before = len(self.ran)
        answer = self._send(command.encode_command(FLEET, FLEET.kid, "work", DEVICE, seq,
                                                   NOW + 60, {"seq": seq}))
        assert answer is not None
        result = command_decode.decode_result(answer, ME.verifier())
        assert (result.device, result.seq) == (DEVICE, seq)
        if seq <= self.taken:
            self._check_repeat(seq, answer, ran_before)
            return
        assert self.ran[ran_before:] == [seq]  # new: it runs, once
        expected = (command.REFUSED if seq % 5 == 0 else
                    command.FAILED if seq % 7 == 0 else command.OK)
        assert result.outcome == expected
        self._record(seq, answer)

    @rule(seq=st.integers(1, 20))
    def unknown_name(self, seq: int) -> None:
        ran_before = len(self.ran)
        answer = self._send(command.encode_command(FLEET, FLEET.kid, "launch", DEVICE, seq,
                                                   NOW + 60))
        assert answer is not None
        if seq <= self.taken:
            self._check_repeat(seq, answer, ran_before)
            return
        result = command_decode.decode_result(answer, ME.verifier())
        assert result.outcome == command.REFUSED and "not supported" in result.detail
        assert len(self.ran) == ran_before
        self._record(seq, answer)

    @rule(seq=st.integers(1, 20), who=st.sampled_from(["rogue", "other", "expired"]))
    def hostile(self, seq: int, who: str) -> None:
        before = list(self.ran)
        if who == "rogue":
            data = command.encode_command(ROGUE, ROGUE.kid, "work", DEVICE, seq, NOW + 60,
                                          {"seq": seq})
        elif who == "other":
            data = command.encode_command(FLEET, FLEET.kid, "work", OTHER, seq, NOW + 60,
                                          {"seq": seq})
        else:
            data = command.encode_command(FLEET, FLEET.kid, "work", DEVICE, seq, NOW - 1,
                                          {"seq": seq})
        answer = self._send(data)
        assert self.ran == before  # nothing hostile or stale runs
        if who == "expired":
            assert answer is not None
            assert command_decode.decode_result(answer, ME.verifier()).outcome == \
                command.REFUSED
        else:
            assert answer is None

    @rule()
    def restart(self) -> None:
        self.responder = self._responder()  # the same state: a reboot

    @invariant()
    def each_seq_ran_at_most_once_in_order(self) -> None:
        assert self.ran == sorted(set(self.ran))


TestResponder = Responder.TestCase
TestResponder.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_command_taken_but_not_answered_is_answered_failed_after_a_restart() -> None:
    """Also once a later command was taken: the seq is known as taken, not as skipped."""
    state = MemState()
    started: list[int] = []

    async def crash(args: Any) -> Done:
        started.append(1)
        raise SystemExit  # the process dies mid-command: no answer kept

    r = CommandResponder(DEVICE, ME, ME.kid, {FLEET.kid: FLEET.verifier()}, state,
                         {"work": crash}, clock=lambda: int(time.time()))
    data = command.encode_command(FLEET, FLEET.kid, "work", DEVICE, 1, int(time.time()) + 60)
    with contextlib.suppress(SystemExit):
        asyncio.run(r.answer(data))
    again = CommandResponder(DEVICE, ME, ME.kid, {FLEET.kid: FLEET.verifier()}, state,
                             {"work": crash}, clock=lambda: int(time.time()))
    answer = asyncio.run(again.answer(data))
    assert answer is not None and started == [1]
    result = command_decode.decode_result(answer, ME.verifier())
    assert result.outcome == command.FAILED and "interrupted" in result.detail
    later = command.encode_command(FLEET, FLEET.kid, "status", DEVICE, 2, int(time.time()) + 60)
    assert asyncio.run(again.answer(later)) is not None  # taken: unknown, refused
    answer = asyncio.run(again.answer(data))
    assert answer is not None
    result = command_decode.decode_result(answer, ME.verifier())
    assert result.outcome == command.FAILED and "interrupted" in result.detail


def test_a_command_answered_later_runs_once_survives_a_restart_and_is_finished_once() -> None:
    """``Later``: taken, not answered now; a repeat (also after a restart) is neither run
    nor answered; ``finish`` answers it once, and a repeat then gets that answer byte for
    byte. Later commands do not push it out of the kept answers while it is owed."""
    state = MemState()
    ran: list[int] = []

    async def update(args: Any) -> Later:
        ran.append(1)
        return Later({"sequence": 7})

    async def work(args: Any) -> Done:
        return Done("ok")

    def responder() -> CommandResponder:
        return CommandResponder(DEVICE, ME, ME.kid, {FLEET.kid: FLEET.verifier()}, state,
                                {"update": update, "work": work}, clock=lambda: NOW)

    data = command.encode_command(FLEET, FLEET.kid, "update", DEVICE, 1, NOW + 60)
    r = responder()
    assert asyncio.run(r.answer(data)) is None and ran == [1]
    assert asyncio.run(r.answer(data)) is None and ran == [1]  # a repeat: nothing
    for seq in range(2, 2 + 2 * ANSWERS_KEPT):  # more commands than answers are kept
        asyncio.run(r.answer(command.encode_command(FLEET, FLEET.kid, "work", DEVICE, seq,
                                                    NOW + 60)))
    again = responder()  # a restart (into the new release)
    assert asyncio.run(again.answer(data)) is None and ran == [1]
    (p,) = again.pending()
    assert (p.seq, p.name, p.note) == (1, "update", {"sequence": 7})
    signed = again.finish(1, command.OK, "", {"state": "committed"})
    result = command_decode.decode_result(signed, ME.verifier())
    assert (result.seq, result.name, result.outcome) == (1, "update", command.OK)
    assert again.pending() == []
    assert asyncio.run(responder().answer(data)) == signed and ran == [1]
    with pytest.raises(KeyError):
        again.finish(1, command.FAILED, "twice")
