"""A command's states as a state machine (hypothesis), without a database: whatever mix of
cancellations, expiries, deliveries and device answers (right, late, repeated,
conflicting) arrives in whatever order, the first answer of the device stands for good,
the fleet's giving up never hides an answer, and nothing leaves a final state. The rules
exercised are the ingest's (``acceptance.Acceptance.answered``) and the queue's
(``command_queue``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cityedge_core.command_decode import Result
from cityedge_fleet import acceptance, command_queue
from cityedge_fleet.command_queue import CommandError
from cityedge_fleet.models import (
    ANSWERED_COMMANDS,
    PENDING_COMMANDS,
    CommandState,
    DeviceState,
    FleetCommand,
)

DEV = "urn:dev:mac:0024befffe804ff1"
T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
RULES = acceptance.Acceptance(3, 10)


class _Session:
    """What the queue's state changes need of a session here: nothing."""

    def add(self, _row: Any) -> None:
        pass


class _Publisher:
    id = DEV
    state = DeviceState.active
    gateway_id = None


class CommandLife(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cmd = FleetCommand(id=1, device_id=DEV, seq=7, name="status", signed=b"",
                                kid="00", created_by="t", expires_at=T0, next_try_at=T0)
        self.first_answer: tuple[str, str] | None = None
        self.gave_up = False

    @rule()
    def cancel(self) -> None:
        before = self.cmd.state
        try:
            command_queue.cancel(_Session(), self.cmd, by="sec")  # type: ignore[arg-type]
        except CommandError as e:
            assert e.status == 409 and before not in PENDING_COMMANDS
            assert self.cmd.state == before
        else:
            assert before in PENDING_COMMANDS
            self.gave_up = True

    @rule()
    def expire(self) -> None:
        if self.cmd.state in PENDING_COMMANDS:  # what expire_due selects
            command_queue.move(self.cmd, CommandState.expired)
            self.gave_up = True

    @rule()
    def delivered(self) -> None:
        if self.cmd.state == CommandState.queued:  # what record_try does on a delivery
            command_queue.move(self.cmd, CommandState.sent)

    @rule(outcome=st.sampled_from(["ok", "refused", "failed"]),
          name=st.sampled_from(["status", "status", "rotate"]),
          detail=st.text(max_size=5))
    def answer(self, outcome: str, name: str, detail: str) -> None:
        before = self.cmd.state
        result = Result(name, DEV, 7, outcome, detail)
        decision = RULES.answered(_Publisher(), self.cmd, result)
        if decision.taken:
            command_queue.record_result(_Session(), self.cmd, result, b"signed")  # type: ignore[arg-type]
            assert self.first_answer is None and before not in ANSWERED_COMMANDS
            assert name == "status"
            self.first_answer = (outcome, detail)
        elif name != "status":
            assert decision.status == acceptance.RESULT_MISMATCH
        else:
            assert self.first_answer is not None
            same = self.first_answer[0] == outcome
            assert decision.status == (acceptance.RESULT_DUPLICATE if same
                                       else acceptance.RESULT_CONFLICT)

    @invariant()
    def the_first_answer_stands(self) -> None:
        if self.first_answer is not None:
            outcome, detail = self.first_answer
            assert self.cmd.state == outcome
            assert self.cmd.result_detail == command_queue.bounded_detail(detail)
        else:
            assert self.cmd.state not in ANSWERED_COMMANDS
            if self.gave_up:
                assert self.cmd.state in (CommandState.cancelled, CommandState.expired)


TestCommandLife = CommandLife.TestCase
TestCommandLife.settings = settings(max_examples=200, stateful_step_count=20, deadline=None)


@pytest.mark.parametrize("state", list(CommandState))
def test_every_state_has_its_transitions_and_finals_have_none(state: CommandState) -> None:
    allowed = command_queue.TRANSITIONS[state]
    assert (not allowed) == (state in ANSWERED_COMMANDS)
    assert state not in allowed
