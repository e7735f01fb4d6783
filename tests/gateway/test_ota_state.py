"""The update's state machine (``ota_state``): the transition table as written, a
hypothesis state machine that drives random events and checks the rules the installer
relies on, and the record's round trip (fields of a newer release kept)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_state import (
    InvalidTransition,
    UpdateRecord,
    UpdateStateError,
    transition,
)

# the table in words (hawkBit's vocabulary); every pair not listed is refused
EXPECTED = {
    (s.IDLE, s.SCHEDULE): s.SCHEDULED,
    (s.COMMITTED, s.SCHEDULE): s.SCHEDULED,
    (s.ROLLED_BACK, s.SCHEDULE): s.SCHEDULED,
    (s.FAILED, s.SCHEDULE): s.SCHEDULED,
    (s.SCHEDULED, s.SCHEDULE): s.SCHEDULED,
    (s.DOWNLOADING, s.SCHEDULE): s.SCHEDULED,
    (s.DOWNLOADED, s.SCHEDULE): s.SCHEDULED,
    (s.SCHEDULED, s.DOWNLOAD): s.DOWNLOADING,
    (s.DOWNLOADING, s.DOWNLOAD): s.DOWNLOADING,
    (s.DOWNLOADING, s.DOWNLOAD_DONE): s.DOWNLOADED,
    (s.DOWNLOADED, s.INSTALL): s.INSTALLING,
    (s.INSTALLING, s.SWITCH): s.TRIAL,
    (s.TRIAL, s.HEALTHY): s.COMMITTED,
    (s.TRIAL, s.UNHEALTHY): s.ROLLED_BACK,
    (s.SCHEDULED, s.FAIL): s.FAILED,
    (s.DOWNLOADING, s.FAIL): s.FAILED,
    (s.DOWNLOADED, s.FAIL): s.FAILED,
    (s.INSTALLING, s.FAIL): s.FAILED,
}


@pytest.mark.parametrize("state", s.STATES)
@pytest.mark.parametrize("event", s.EVENTS)
def test_the_transition_table(state: str, event: str) -> None:
    if (state, event) in EXPECTED:
        assert transition(state, event) == EXPECTED[(state, event)]
    else:
        with pytest.raises(InvalidTransition):
            transition(state, event)


def test_the_table_holds_nothing_more() -> None:
    assert s.TRANSITIONS == EXPECTED


class UpdateLife(RuleBasedStateMachine):
    """Random events, valid or not: a refused event changes nothing, and the path taken
    obeys the installer's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.state = s.IDLE
        self.path: list[str] = [s.IDLE]

    @rule(event=st.sampled_from(s.EVENTS))
    def happen(self, event: str) -> None:
        before = self.state
        try:
            self.state = transition(before, event)
        except InvalidTransition:
            assert (before, event) not in s.TRANSITIONS
            return
        self.path.append(self.state)
        if self.state == s.COMMITTED:  # only through a trial that proved health
            assert before == s.TRIAL and event == s.HEALTHY
        if self.state == s.TRIAL:  # only after a whole install
            assert before == s.INSTALLING and event == s.SWITCH
        if self.state == s.INSTALLING:
            assert before == s.DOWNLOADED
        if self.state == s.ROLLED_BACK:
            assert before == s.TRIAL

    @invariant()
    def busy_states_take_no_new_release(self) -> None:
        if self.state in s.BUSY:
            with pytest.raises(InvalidTransition):
                transition(self.state, s.SCHEDULE)

    @invariant()
    def every_state_can_end(self) -> None:
        # from anywhere some sequence of events reaches a settled state
        seen, todo = {self.state}, [self.state]
        while todo:
            cur = todo.pop()
            for (a, _e), b in s.TRANSITIONS.items():
                if a == cur and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert seen & set(s.SETTLED)


TestUpdateLife = UpdateLife.TestCase


def test_an_update_walks_the_hawkbit_stages() -> None:
    rec = UpdateRecord()
    for event in (s.SCHEDULE, s.DOWNLOAD, s.DOWNLOAD, s.DOWNLOAD_DONE, s.INSTALL, s.SWITCH,
                  s.HEALTHY):
        rec = rec.after(event)
    assert rec.state == s.COMMITTED


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                          max_size=3),
                     max_leaves=6)


@given(state=st.sampled_from(s.STATES), seq=st.integers(0, 2**53),
       version=st.text(max_size=10), extra=st.dictionaries(
           st.text(min_size=1, max_size=10).filter(
               lambda k: k not in UpdateRecord.__dataclass_fields__), _json, max_size=4))
def test_a_record_round_trips_and_keeps_fields_it_does_not_know(
        state: str, seq: int, version: str, extra: dict[str, Any]) -> None:
    rec = UpdateRecord(state=state, sequence=seq, installed_sequence=seq, version=version,
                       extra=extra)
    again = UpdateRecord.from_bytes(rec.to_bytes())
    assert again == rec
    assert {k: v for k, v in json.loads(again.to_bytes()).items() if k in extra} == extra


@pytest.mark.parametrize("data", [b"", b"[]", b'{"state": "flying"}', b'{"sequence": "7"}',
                                  b'{"sequence": true}', b"\xff"])
def test_a_damaged_record_is_an_error_not_a_guess(data: bytes) -> None:
    with pytest.raises(UpdateStateError):
        UpdateRecord.from_bytes(data)
