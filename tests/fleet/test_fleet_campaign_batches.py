"""A wave's rotations are started in transactions of at most
``CampaignLimits.starts_per_transaction`` (SQLite's write lock is held for one batch at a
time), yet the whole wave starts within one runner round; a pause between two batches
stops the rest of the wave until resumed, and no other wave starts before it is all
started. Real fleet (campaign store and runner, rotation, command queue) on SQLite, the
devices played by ``support.campaign_sim``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import Session, col, select

from cityedge_fleet import campaign_store, command_key
from cityedge_fleet.campaign import LIMITS, CampaignLimits
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import AuditRecord, KeyRotation

from support.campaign_sim import SimFleet

OLD = dt.datetime.now(dt.UTC) - dt.timedelta(days=70)


@pytest.fixture
def sim(api_settings_engine: tuple[Settings, Any]) -> SimFleet:
    settings, engine = api_settings_engine
    return SimFleet(engine, settings)


@pytest.fixture
def rotations_per_commit() -> Iterator[list[int]]:
    """The number of KeyRotation rows each committed transaction inserted (commits that
    inserted none are left out)."""
    pending: dict[int, int] = {}
    out: list[int] = []

    def after_flush(session: Any, _ctx: Any) -> None:
        n = sum(1 for o in session.new if isinstance(o, KeyRotation))
        pending[id(session)] = pending.get(id(session), 0) + n

    def after_commit(session: Any) -> None:
        if session.in_nested_transaction():
            return  # a savepoint released: the transaction goes on
        n = pending.pop(id(session), 0)
        if n:
            out.append(n)

    def after_rollback(session: Any) -> None:
        pending.pop(id(session), None)

    event.listen(Session, "after_flush", after_flush)
    event.listen(Session, "after_commit", after_commit)
    event.listen(Session, "after_rollback", after_rollback)
    try:
        yield out
    finally:
        event.remove(Session, "after_flush", after_flush)
        event.remove(Session, "after_commit", after_commit)
        event.remove(Session, "after_rollback", after_rollback)


def _create(sim: SimFleet, wave: int) -> int:
    with Session(sim.engine) as s:
        camp, _ = campaign_store.create(s, selector_text="all", wave_size=wave,
                                        max_failures="0", by="test", confirmed=True)
        s.commit()
        return camp.id or 0


def _members(sim: SimFleet, cid: int) -> list[campaign_store.CampaignMember]:
    with Session(sim.engine) as s:
        rows = campaign_store.members_of(s, cid)
        for r in rows:
            s.expunge(r)
        return rows


def _runner(sim: SimFleet, **clim: Any) -> CampaignRunner:
    return CampaignRunner(sim.engine, sim.settings, command_key.from_settings(sim.settings),
                          clim=CampaignLimits(**clim), renew=False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_100_device_wave_starts_in_one_round_in_batches_of_the_cap(
        sim: SimFleet, rotations_per_commit: list[int]) -> None:
    sim.add_devices(100, issued=OLD)
    cid = _create(sim, wave=100)
    run = _runner(sim)
    cap = LIMITS.starts_per_transaction
    assert cap == 20
    out = run.round(renewal_due=False)
    assert out.started == 100 and out.campaigns == {cid: "running"}
    assert rotations_per_commit == [cap] * (100 // cap)  # 5 transactions of 20
    rows = _members(sim, cid)
    assert {(m.wave, str(m.status), m.attempts) for m in rows} == {(1, "active", 1)}
    with Session(sim.engine) as s:
        assert len(s.exec(select(KeyRotation)).all()) == 100
        waves = s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "campaign.wave")).all()
    assert [json.loads(w.detail) for w in waves] == [{"wave": 1, "devices": 100}]  # once
    # the next round starts nothing: the wave is under way
    assert run.round(renewal_due=False).started == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_pause_between_batches_holds_the_rest_of_the_wave(
        sim: SimFleet, rotations_per_commit: list[int]) -> None:
    sim.add_devices(40, issued=OLD)
    cid = _create(sim, wave=30)
    clim = CampaignLimits(starts_per_transaction=7)
    signer = command_key.from_settings(sim.settings)
    with Session(sim.engine) as s:  # one call, as the runner's first of a round
        got = campaign_store.advance(s, cid, signer=signer, lim=sim.settings.limits,
                                     clim=clim)
        s.commit()
    assert got.more and got.wave == 1 and len(got.start) == 7
    with Session(sim.engine) as s:
        campaign_store.act(s, cid, "pause", by="test")
        s.commit()
    run = _runner(sim, starts_per_transaction=7)
    assert run.round(renewal_due=False).started == 0  # paused: nothing more starts
    rows = _members(sim, cid)
    assert sum(1 for m in rows if m.wave == 1) == 30
    assert sum(1 for m in rows if m.rotation_id is not None) == 7
    with Session(sim.engine) as s:
        campaign_store.act(s, cid, "resume", by="test")
        s.commit()
    out = run.round(renewal_due=False)
    assert out.started == 23  # the rest of wave 1, and not wave 2
    assert rotations_per_commit == [7, 7, 7, 7, 2]
    rows = _members(sim, cid)
    assert [m.wave for m in rows] == [1] * 30 + [None] * 10
    assert all(m.rotation_id is not None for m in rows[:30])
    # the wave goes through; then wave 2 (10 devices: two batches) in one round
    for _ in range(20):
        with Session(sim.engine) as s:
            states = {str(r.state) for r in s.exec(select(KeyRotation))}
        if states <= {"proven", "old-revoked"}:
            break
        sim.step()
    else:
        raise AssertionError("wave 1 did not finish: %s" % states)
    del rotations_per_commit[:]
    out = run.round(renewal_due=False)
    assert out.started == 10 and rotations_per_commit == [7, 3]
    assert [m.wave for m in _members(sim, cid)] == [1] * 30 + [2] * 10
