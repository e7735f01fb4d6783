"""The campaign policy (``cityedge_fleet.campaign``), without a database: selectors as
tables, a member's status from its rotation as a table, the rules of ``decide`` one by
one, and a hypothesis state machine over any order of device outcomes, pause, resume and
abort."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cityedge_fleet import campaign as c
from cityedge_fleet.campaign import (
    CampaignError,
    CampaignState,
    DeviceFacts,
    Member,
    MemberStatus,
    SelectorError,
)

M = MemberStatus
S = CampaignState
DAY = 86400.0
NOW = 1_800_000_000.0
DEV = DeviceFacts(id="urn:dev:mac:01", site="harbour", model="ce-air-1",
                  hardware_class="esp32", firmware="1.4.0", state="active",
                  tags=frozenset({"air", "pilot"}), key_issued_at=NOW - 70 * DAY,
                  cert_expires_at=NOW + 20 * DAY, issuer="4f2a0c1b9e8d7a65")


# ------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(("text", "matches"), [
    ("all", True),
    ("site=harbour", True),
    ("site=park", False),
    ("site=park|harbour", True),
    ("site!=harbour", False),
    ("site=harbour,model=ce-air-1,key-age>60d", True),
    ("key-age>70d", False),  # exactly 70 days: not above
    ("key-age>=70d", True),
    ("key-age<11w", True),
    ("key-age<10w", False),
    ("cert-expiry<30d", True),
    ("cert-expiry>30d", False),
    ("tag=pilot", True),
    ("tag=noise", False),
    ("tag!=pilot", False),
    ("tag=pilot,tag=air", True),
    ("hardware-class=esp32", True),
    ("hardware_class=rp2", False),
    ("firmware=1.4.0", True),
    ("state=active", True),
    ("state=quarantined", False),
    (" site = harbour , key-age > 1h ", True),
    ("intermediate=4f2a0c1b9e8d7a65", True),
    ("intermediate=9c1e000000000000", False),
    ("intermediate=9c1e000000000000|4f2a0c1b9e8d7a65", True),
    ("intermediate!=4f2a0c1b9e8d7a65", False),
    ("intermediate!=9c1e000000000000,site=harbour", True),
])
def test_selector_matches(text: str, matches: bool) -> None:
    assert c.parse_selector(text).matches(DEV, NOW) is matches


def test_selector_without_a_certificate_has_no_age() -> None:
    bare = DeviceFacts(id="urn:dev:mac:02")
    assert not c.parse_selector("key-age>0s").matches(bare, NOW)
    assert not c.parse_selector("key-age<100w").matches(bare, NOW)
    assert c.parse_selector("site!=harbour").matches(bare, NOW)
    assert not c.parse_selector("intermediate=4f2a0c1b9e8d7a65").matches(bare, NOW)


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("   ", "empty"),
    ("site", "not a term"),
    ("colour=red", "unknown key 'colour'"),
    ("key-age=60d", "takes >, <"),
    ("key-age>60", "not a duration"),
    ("key-age>60y", "not a duration"),
    ("key-age>-1d", "not a duration"),
    ("site>harbour", "takes = or !="),
    ("site=", "empty value"),
    ("site=a|", "empty value"),
    ("site=a,site=b", "given twice"),
    ("intermediate=old", "16 lower-case hex"),
    ("intermediate=4F2A0C1B9E8D7A65", "16 lower-case hex"),
    ("intermediate>4f2a0c1b9e8d7a65", "takes = or !="),
    ("intermediate=4f2a0c1b9e8d7a65,intermediate=9c1e000000000000", "given twice"),
    ("site=a,,model=b", "not a term"),
    ("all,site=a", "not a term"),
    ("x" * 2000, "over 1024 characters"),
    (",".join(["site!=a"] * 40), "over 32 terms"),
])
def test_selector_errors_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(SelectorError, match=says.replace("(", r"\(")):
        c.parse_selector(text)


@pytest.mark.parametrize(("text", "canonical"), [
    ("all", "all"),
    ("site = harbour,key-age>1440m", "site=harbour,key-age>1d"),
    ("hardware_class=esp32|rp2,cert-expiry<=3600s", "hardware-class=esp32|rp2,"
                                                     "cert-expiry<=1h"),
    ("key-age>14d", "key-age>2w"),
    ("key-age>90s", "key-age>90s"),
])
def test_selector_text_is_canonical_and_parses_back(text: str, canonical: str) -> None:
    sel = c.parse_selector(text)
    assert sel.text() == canonical
    assert c.parse_selector(sel.text()) == sel


@pytest.mark.parametrize(("text", "members", "allowed"), [
    ("5%", 1000, 50), ("5%", 19, 0), ("5%", 20, 1), ("0", 10, 0), ("3", 10, 3),
    ("100%", 7, 7), ("0.5%", 1000, 5),
])
def test_max_failures(text: str, members: int, allowed: int) -> None:
    assert c.parse_max_failures(text, members) == allowed


@pytest.mark.parametrize("text", ["", "x", "-1", "101%", "-5%", "5%%", "1.5"])
def test_max_failures_refused(text: str) -> None:
    with pytest.raises(CampaignError, match="a count"):
        c.parse_max_failures(text, 100)


# ------------------------------------------------------------- a member's status


@pytest.mark.parametrize(("state", "reason", "delivered", "attempts", "status"), [
    (None, "", False, 0, M.waiting),
    ("sent", "", False, 1, M.offline),
    ("pending", "", False, 1, M.offline),
    ("sent", "", False, 1, M.offline),  # the device is away: the publisher re-sends
    ("sent", "", True, 1, M.active),
    ("csr-received", "", True, 1, M.active),
    ("issued", "", True, 1, M.active),
    ("proven", "", True, 1, M.done),
    ("old-revoked", "", True, 1, M.done),
    ("failed", "rotate expired: the fleet gave up after 0 sends", False, 1, M.retry),
    ("failed", "rotate cancelled: campaign 3 aborted", False, 1, M.retry),
    ("failed", "rotate expired: the fleet gave up after 0 sends", False, 3, M.failed),
    ("failed", "rotate expired: the fleet gave up after 2 sends", True, 1, M.failed),
    ("failed", "rotate refused: stale seq", True, 1, M.failed),
    ("failed", "csr_bad_csr: CN", True, 1, M.failed),
    ("failed", "install-cert expired: gave up", True, 1, M.failed),
])
def test_member_status(state: str | None, reason: str, delivered: bool, attempts: int,
                       status: MemberStatus) -> None:
    assert c.member_status(state, reason, delivered, attempts, 3) == status


def test_a_rotate_command_not_tried_yet_is_not_offline() -> None:
    """A wave just started is not settled: its commands have not been tried yet."""
    for state in ("pending", "sent"):
        assert c.member_status(state, "", False, 1, 3, rotate_tried=False) == M.active


def test_retry_waits_double_up_to_the_cap() -> None:
    waits = [c.retry_wait_s(n) for n in range(1, 10)]
    assert waits[:3] == [600.0, 1200.0, 2400.0]
    assert max(waits) == c.LIMITS.retry_max_s


# ------------------------------------------------------------------- decide's rules


def members(*statuses: tuple[MemberStatus, int | None]) -> list[Member]:
    return [Member("d%02d" % i, s, w) for i, (s, w) in enumerate(statuses)]


def test_rule1_not_running_starts_nothing() -> None:
    ms = members((M.waiting, None), (M.retry, 1))
    for state in (S.paused, S.halted, S.aborted, S.done):
        plan = c.decide(state, 1, 10, 5, ms, NOW)
        assert plan.start == [] and plan.state == state


def test_rule2_halts_when_failures_exceed_the_allowance_not_before() -> None:
    at = members((M.failed, 1), (M.failed, 1), (M.active, 1), (M.waiting, None))
    assert c.decide(S.running, 1, 3, 2, at, NOW).state == S.running
    over = members((M.failed, 1), (M.failed, 1), (M.failed, 1), (M.waiting, None))
    plan = c.decide(S.running, 1, 3, 2, over, NOW)
    assert plan.state == S.halted and plan.start == [] and "3 failures, 2 allowed" in plan.why


def test_rule3_done_when_all_done_or_failed() -> None:
    plan = c.decide(S.running, 2, 2, 5, members((M.done, 1), (M.failed, 2)), NOW)
    assert plan.state == S.done
    plan = c.decide(S.running, 2, 2, 5, members((M.done, 1), (M.retry, 2)), NOW)
    assert plan.state == S.running


def test_rule4_retries_when_due_in_their_own_wave() -> None:
    ms = [Member("a", M.retry, 1, NOW - 1), Member("b", M.retry, 1, NOW + 60),
          Member("c", M.active, 2)]
    plan = c.decide(S.running, 2, 1, 5, ms, NOW)
    assert plan.start == ["a"] and plan.wave == 2


def test_rule5_next_wave_only_when_settled() -> None:
    ms = members((M.done, 1), (M.active, 1), (M.waiting, None), (M.waiting, None))
    assert c.decide(S.running, 1, 2, 5, ms, NOW).start == []
    ms = members((M.done, 1), (M.offline, 1), (M.waiting, None), (M.waiting, None),
                 (M.waiting, None))
    plan = c.decide(S.running, 1, 2, 5, ms, NOW)
    assert plan.start == ["d02", "d03"] and plan.wave == 2
    first = c.decide(S.running, 0, 2, 5, members(*[(M.waiting, None)] * 3), NOW)
    assert first.start == ["d00", "d01"] and first.wave == 1


def test_transitions() -> None:
    assert c.transition(S.running, "pause") == S.paused
    assert c.transition(S.paused, "resume") == S.running
    assert c.transition(S.paused, "abort") == S.aborted
    assert c.transition(S.running, "abort") == S.aborted
    for state, action in [(S.running, "resume"), (S.paused, "pause"), (S.halted, "resume"),
                          (S.aborted, "resume"), (S.done, "abort"), (S.halted, "abort")]:
        with pytest.raises(CampaignError, match="cannot"):
            c.transition(state, action)


# ------------------------------------------------------------------ state machine

OUTCOMES = st.sampled_from([M.active, M.done, M.failed, M.offline, M.retry])


class CampaignMachine(RuleBasedStateMachine):
    """A model of the store: ``decide`` each round, members' outcomes in any order."""

    @initialize(n=st.integers(1, 25), wave_size=st.integers(1, 8),
                allowed=st.integers(0, 6))
    def setup(self, n: int, wave_size: int, allowed: int) -> None:
        self.state = S.running
        self.wave = 0
        self.wave_size = wave_size
        self.allowed = allowed
        self.now = NOW
        self.members = [Member("d%02d" % i) for i in range(n)]
        self.waves: dict[str, int] = {}  # device -> the wave it was first started in
        self.ever_final = False

    def _index(self, i: int) -> int:
        return i % len(self.members)

    @rule(i=st.integers(0, 100), outcome=OUTCOMES, later=st.booleans())
    def device_outcome(self, i: int, outcome: MemberStatus, later: bool) -> None:
        moving = [k for k, m in enumerate(self.members)
                  if m.status in (M.active, M.offline)]  # a started, unfinished rotation
        if not moving:
            return
        k = moving[i % len(moving)]
        m = self.members[k]
        self.members[k] = Member(
            m.device_id, outcome, m.wave,
            (self.now + (60 if later else -1)) if outcome == M.retry else None)

    @rule(seconds=st.integers(0, 120))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule(action=st.sampled_from(["pause", "resume", "resume", "abort"]),
          dice=st.integers(0, 9))
    def operator(self, action: str, dice: int) -> None:
        if action == "abort" and dice:
            return  # an abort ends everything: one time in ten
        try:
            to = c.transition(self.state, action)
        except CampaignError:
            if action == "abort":
                assert self.state in c.FINAL
            return
        assert self.state not in c.FINAL
        self.state = to

    @rule()
    def round(self) -> None:
        before = self.state
        failures = sum(m.status == M.failed for m in self.members)
        plan = c.decide(self.state, self.wave, self.wave_size, self.allowed, self.members,
                        self.now)
        if before != S.running:
            assert plan.start == [] and plan.state == before  # 1: paused, final
        elif failures > self.allowed:
            assert plan.state == S.halted and plan.start == []  # 2: exactly when crossed
        else:
            assert plan.state != S.halted
        if plan.state == S.done:
            assert all(m.status in c.FINISHED for m in self.members)
        assert len(plan.start) == len(set(plan.start))
        by_id = {m.device_id: m for m in self.members}
        new_wave = plan.wave != self.wave
        if new_wave:
            assert plan.wave == self.wave + 1
            assert all(m.status in c.SETTLED for m in self.members if m.wave == self.wave)
        for dev in plan.start:
            m = by_id[dev]
            if m.status == M.waiting:
                assert new_wave and dev not in self.waves
                self.waves[dev] = plan.wave
            else:
                assert m.status == M.retry and (m.next_try_at or 0) <= self.now
                assert self.waves[dev] == m.wave  # the same wave as before
        assert sum(1 for d in plan.start if by_id[d].status == M.waiting) <= self.wave_size
        self.state = plan.state
        self.wave = plan.wave
        self.members = [Member(m.device_id, M.offline, self.waves[m.device_id])
                        if m.device_id in set(plan.start) else m for m in self.members]

    @invariant()
    def final_states_stay_and_start_nothing(self) -> None:
        if self.ever_final:
            assert self.state in c.FINAL
        self.ever_final = self.state in c.FINAL

    @invariant()
    def one_wave_per_device(self) -> None:
        for m in self.members:
            if m.wave is not None:
                assert self.waves[m.device_id] == m.wave

    @precondition(lambda self: self.state in (S.aborted, S.halted))
    @rule()
    def nothing_new_after_abort_or_halt(self) -> None:
        plan = c.decide(self.state, self.wave, self.wave_size, self.allowed, self.members,
                        self.now + 10 * DAY)
        assert plan.start == [] and plan.state == self.state


CampaignMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=80)
TestCampaignMachine = CampaignMachine.TestCase


IDS = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)


@given(ids=st.lists(IDS, min_size=1, max_size=4, unique=True), issuer=IDS,
       negate=st.booleans())
def test_the_intermediate_selector_round_trips_and_matches_its_ids(
        ids: list[str], issuer: str, negate: bool) -> None:
    text = "intermediate%s%s" % ("!=" if negate else "=", "|".join(ids))
    sel = c.parse_selector(text)
    assert sel.text() == text and c.parse_selector(sel.text()) == sel
    dev = DeviceFacts(id="urn:dev:mac:03", issuer=issuer)
    assert sel.matches(dev, NOW) is ((issuer in ids) != negate)
