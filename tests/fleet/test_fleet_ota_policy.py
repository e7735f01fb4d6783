"""The OTA policy (``cityedge_fleet.ota``) as tables and properties: waves, the success
threshold, member statuses from commands, the campaign's rules, and Range parsing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_fleet.campaign import CampaignError, CampaignState
from cityedge_fleet.ota import (
    CommandFacts,
    Member,
    MemberStatus,
    RangeRefused,
    decide,
    member_status,
    parse_range,
    parse_success,
    parse_waves,
)

M = MemberStatus
R = CampaignState.running


@pytest.mark.parametrize(("text", "n", "want"), [
    ("1%,10%,100%", 1000, [10, 100, 1000]),
    ("1%,10%,100%", 50, [1, 5, 50]),
    ("1%,10%,100%", 5, [1, 5]),  # 1% and 10% of 5 are both 1: merged
    ("100%", 7, [7]),
    ("5,50,100%", 1000, [5, 50, 1000]),
    ("2,10", 10, [2, 10]),
    ("0.5%,100%", 1000, [5, 1000]),
])
def test_waves(text: str, n: int, want: list[int]) -> None:
    assert parse_waves(text, n) == want


@pytest.mark.parametrize(("text", "why"), [
    ("10%,1%,100%", "below the wave before"),
    ("1%,10%", "must take every device"),
    ("0%,100%", "above 0%"),
    ("101%", "at most 100%"),
    ("0,100%", "at least 1"),
    ("ten%", "not a share"),
    ("1.5,100%", "not a share"),
    (",".join(["100%"] * 17), "1 to 16"),
])
def test_bad_waves(text: str, why: str) -> None:
    with pytest.raises(CampaignError, match=why) as e:
        parse_waves(text, 100)
    assert e.value.status == 422


def test_success() -> None:
    assert parse_success("90%") == 90.0 and parse_success("100%") == 100.0
    for bad in ("90", "101%", "-1%", "x"):
        with pytest.raises(CampaignError):
            parse_success(bad)


@pytest.mark.parametrize(("facts", "progress", "want"), [
    (None, "", (M.waiting, "")),
    (CommandFacts("queued"), "", (M.pending, "")),
    (CommandFacts("queued", attempts=2), "", (M.offline, "")),
    (CommandFacts("sent", sends=1, attempts=1), "", (M.sent, "")),
    (CommandFacts("sent", sends=1), "downloading", (M.downloading, "")),
    (CommandFacts("sent", sends=1), "downloaded", (M.downloaded, "")),
    (CommandFacts("ok", sends=1), "downloaded", (M.committed, "")),
    (CommandFacts("refused", 1, 1, "rollback"), "", (M.failed, "refused: rollback")),
    (CommandFacts("failed", 1, 1, "health", "rolled-back"), "",
     (M.rolled_back, "rolled back: health")),
    (CommandFacts("failed", 1, 1, "hash", "failed"), "", (M.failed, "failed: hash")),
    (CommandFacts("expired", 0, 5), "",
     (M.missed, "the update command expired before it reached the device")),
    (CommandFacts("cancelled", 0, 0), "",
     (M.missed, "the update command cancelled before it reached the device")),
    (CommandFacts("expired", 1, 1), "",
     (M.failed, "no answer before the update command expired")),
])
def test_member_status(facts: CommandFacts | None, progress: str,
                       want: tuple[MemberStatus, str]) -> None:
    assert member_status(facts, progress) == want


def members(*spec: tuple[MemberStatus, int | None]) -> list[Member]:
    return [Member("d%d" % i, s, w) for i, (s, w) in enumerate(spec)]


def test_rules_in_order() -> None:
    w = [1, 3]
    # 1: not running
    assert decide(CampaignState.paused, 0, w, 100, 0, members((M.waiting, None))).start == []
    # 2: over the failures allowed
    plan = decide(R, 1, w, 100, 0, members((M.rolled_back, 1), (M.waiting, None)))
    assert plan.state == CampaignState.halted and plan.start == []
    # 3: all finished
    plan = decide(R, 2, w, 100, 5, members((M.committed, 1), (M.missed, 2), (M.failed, 2)))
    assert plan.state == CampaignState.done
    # 4: the first wave
    plan = decide(R, 0, w, 100, 0, members(*[(M.waiting, None)] * 3))
    assert (plan.wave, plan.start) == (1, ["d0"])
    # 4: the wave has not met its threshold (answered is not enough: it must commit)
    plan = decide(R, 1, w, 100, 1, members((M.downloaded, 1), (M.waiting, None),
                                           (M.waiting, None)))
    assert (plan.wave, plan.start) == (1, [])
    plan = decide(R, 1, w, 100, 0, members((M.committed, 1), (M.waiting, None),
                                           (M.waiting, None)))
    assert (plan.wave, plan.start) == (2, ["d1", "d2"])


def test_an_offline_member_holds_its_wave_only_if_the_threshold_needs_it() -> None:
    wave = members((M.committed, 1), (M.committed, 1), (M.committed, 1), (M.offline, 1),
                   (M.waiting, None))
    assert decide(R, 1, [4, 5], 75, 0, wave).start == ["d4"]
    assert decide(R, 1, [4, 5], 100, 0, wave).start == []



@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), shares=st.lists(st.integers(1, 99), max_size=3),
       success=st.integers(0, 100), allowed=st.integers(0, 10),
       outcomes=st.lists(st.sampled_from([M.committed, M.rolled_back, M.failed, M.missed,
                                          M.offline]), min_size=60, max_size=60))
def test_a_campaign_never_starts_a_member_twice_nor_past_its_wave(
        n: int, shares: list[int], success: int, allowed: int,
        outcomes: list[MemberStatus]) -> None:
    waves = parse_waves(",".join(["%d%%" % s for s in sorted(shares)] + ["100%"]), n)
    ms = {i: Member("d%d" % i) for i in range(n)}
    state, wave, started_order = R, 0, []
    for _ in range(3 * n + 5):
        plan = decide(state, wave, waves, success, allowed, list(ms.values()))
        assert len(set(plan.start)) == len(plan.start)
        for d in plan.start:
            i = int(d[1:])
            assert ms[i].status == M.waiting  # never started twice
            started_order.append(i)
            ms[i] = Member(d, outcomes[i], plan.wave)
        if plan.wave > wave:  # rule 4: the previous wave met its threshold
            if wave:
                cur = [m for m in ms.values() if m.wave == wave]
                got = sum(1 for m in cur if m.status == M.committed)
                assert got >= math.ceil(len(cur) * success / 100 - 1e-9)
            assert sum(1 for m in ms.values() if m.wave is not None) <= waves[plan.wave - 1]
        state, wave = plan.state, plan.wave
        failures = sum(1 for m in ms.values() if m.status in (M.rolled_back, M.failed))
        if state == CampaignState.halted:
            assert failures > allowed
            break
        if state == CampaignState.done:
            break
        for i, m in ms.items():  # the offline ones come back and commit
            if m.status == M.offline:
                ms[i] = Member(m.device_id, M.committed, m.wave)
    assert started_order == sorted(started_order)  # member order
    assert failures <= allowed or state == CampaignState.halted


@pytest.mark.parametrize(("header", "size", "want"), [
    (None, 100, None),
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=90-", 100, (90, 99)),
    ("bytes=90-1000", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-1000", 100, (0, 99)),
    (" bytes=5-5 ", 100, (5, 5)),
])
def test_range(header: str | None, size: int, want: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == want


@pytest.mark.parametrize("header", [
    "bytes=100-", "bytes=9-1", "bytes=-0", "bytes=", "bytes=-", "bytes=0-1,3-4",
    "bytes=1234567890123456-", "bytes=-1234567890123456", "octets=0-1", "bytes=a-b",
    "bytes=0-1;", "bytes = 0-1"])
def test_bad_range(header: str) -> None:
    with pytest.raises(RangeRefused):
        parse_range(header, 100)


@given(header=st.text(max_size=40), size=st.integers(1, 2**40))
def test_any_range_header_is_one_in_bounds_range_or_refused(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeRefused:
        return
    assert got is not None
    first, last = got
    assert 0 <= first <= last < size
