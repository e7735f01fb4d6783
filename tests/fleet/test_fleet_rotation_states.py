"""A key rotation's states (``cityedge_fleet.rotation.RotationPolicy``), I/O-free: the table
as written, and a hypothesis state machine that throws every event at a rotation in any
order (late, repeated, after a failure) and holds it to the protocol: the happy path only
forwards and one step at a time, ``old-revoked`` is final and comes only after
``proven``, ``proven`` only after an issue, and ``failed`` is left only for ``proven``
when a certificate was issued."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cityedge_fleet import rotation
from cityedge_fleet.models import OPEN_ROTATIONS, RotationState

S = RotationState
P = rotation.RotationPolicy
PATH = [S.pending, S.sent, S.csr_received, S.issued, S.proven, S.old_revoked]
STEP = {S.pending: rotation.SEND, S.sent: rotation.CSR_TAKEN,
        S.csr_received: rotation.ISSUED, S.issued: rotation.NEW_KEY_SEEN,
        S.proven: rotation.ERASED}


@pytest.mark.parametrize(("state", "event", "issued", "to"), [
    (S.pending, rotation.SEND, False, S.sent),
    (S.sent, rotation.CSR_TAKEN, False, S.csr_received),
    (S.csr_received, rotation.ISSUED, False, S.issued),
    (S.issued, rotation.NEW_KEY_SEEN, True, S.proven),
    (S.proven, rotation.ERASED, True, S.old_revoked),
    *[(s, rotation.FAIL, False, S.failed) for s in OPEN_ROTATIONS],
    (S.failed, rotation.NEW_KEY_SEEN, True, S.proven),  # what the device did stands
    (S.failed, rotation.NEW_KEY_SEEN, False, None),  # no certificate: nothing to prove
    (S.failed, rotation.FAIL, True, None),
    (S.old_revoked, rotation.FAIL, True, None),  # done is done
    (S.old_revoked, rotation.NEW_KEY_SEEN, True, None),
    (S.sent, rotation.SEND, False, None),  # repeated
    (S.sent, rotation.ISSUED, False, None),  # out of order
    (S.pending, rotation.NEW_KEY_SEEN, False, None),
    (S.issued, rotation.ERASED, True, None),  # no erase before the proof
])
def test_the_table(state: RotationState, event: str, issued: bool,
                   to: RotationState | None) -> None:
    assert P.next_state(state, event, issued) == to


def test_an_unknown_event_is_a_bug() -> None:
    with pytest.raises(ValueError):
        P.next_state(S.sent, "csr-maybe")


class RotationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = S.pending
        self.issued = False  # a certificate was issued in this rotation
        self.history = [S.pending]

    @rule(event=st.sampled_from(rotation.EVENTS))
    def event(self, event: str) -> None:
        was = self.state
        to = P.next_state(was, event, self.issued)
        if to is None:
            return
        if was in PATH and to in PATH:  # forwards, one step, by that step's event
            assert PATH.index(to) == PATH.index(was) + 1
            assert STEP[was] == event
        if was == S.failed:
            assert (to, event, self.issued) == (S.proven, rotation.NEW_KEY_SEEN, True)
        if to == S.failed:
            assert event == rotation.FAIL and was in OPEN_ROTATIONS
        if to == S.issued:
            self.issued = True
        self.state = to
        self.history.append(to)

    @invariant()
    def ordered(self) -> None:
        h = self.history
        if S.old_revoked in h:
            assert h[-1] == S.old_revoked and h[-2] == S.proven
        if S.proven in h:
            assert S.issued in h and self.issued
        if S.issued in h:
            assert h.index(S.csr_received) < h.index(S.issued)


TestRotationMachine = RotationMachine.TestCase
TestRotationMachine.settings = settings(max_examples=300, stateful_step_count=30,
                                        deadline=None)
