"""Rotation campaigns through the real fleet (campaign store and runner, rotation, ingest,
CA, command queue) on SQLite and PostgreSQL, the devices played in-process by
``support.campaign_sim`` (real keys, CSRs, certificates and signatures): waves, devices
offline until they return, a stolen device that refuses (it fails alone, the wave goes
on), the failure threshold, pause/resume/abort, retries of devices never reached, the
selection's preview and confirmation, and exact status counts."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet import campaign_store, command_key
from cityedge_fleet.campaign import CampaignError, CampaignLimits, SelectorError
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import AuditRecord, Credential, CredentialStatus, KeyRotation
from cityedge_fleet.registry import set_state

from support.campaign_sim import SimFleet

NOW = dt.datetime.now(dt.UTC)
OLD = NOW - dt.timedelta(days=70)


@pytest.fixture
def sim(api_settings_engine: tuple[Settings, Any]) -> SimFleet:
    settings, engine = api_settings_engine
    return SimFleet(engine, settings)


def runner(sim: SimFleet, **clim: Any) -> CampaignRunner:
    return CampaignRunner(sim.engine, sim.settings, command_key.from_settings(sim.settings),
                          clim=CampaignLimits(**clim), renew=False)


def create(sim: SimFleet, select_: str = "site=harbour", wave: int = 5,
           max_failures: str = "1", confirmed: bool = False) -> int:
    with Session(sim.engine) as s:
        camp, _ = campaign_store.create(s, selector_text=select_, wave_size=wave,
                                        max_failures=max_failures, by="test",
                                        confirmed=confirmed)
        s.commit()
        return camp.id or 0


def status(sim: SimFleet, cid: int) -> dict[str, Any]:
    with Session(sim.engine) as s:
        return campaign_store.status(s, cid)


def settle(sim: SimFleet, run: CampaignRunner, rounds: int = 30) -> None:
    """Runner round, deliver and answer, until nothing moves."""
    for _ in range(rounds):
        out = run.round(renewal_due=False)
        delivered = sim.step()
        if not out.started and not delivered:
            return
    raise AssertionError("still moving after %d rounds" % rounds)


def members(sim: SimFleet, cid: int) -> dict[str, campaign_store.CampaignMember]:
    with Session(sim.engine) as s:
        rows = campaign_store.members_of(s, cid)
        for r in rows:
            s.expunge(r)
        return {r.device_id: r for r in rows}


def test_waves_offline_devices_and_a_stolen_one(sim: SimFleet) -> None:
    ids = sim.add_devices(20, issued=OLD)
    offline = {ids[3], ids[12]}  # one in wave 1, one in wave 3
    stolen = ids[7]  # wave 2: refuses its rotate command
    for d in offline:
        sim.devices[d].online = False
    sim.devices[stolen].refuse = True
    cid = create(sim, "site=harbour,key-age>60d", wave=5, max_failures="1")
    run = runner(sim)
    # wave 1 starts; nothing of wave 2 before every device of wave 1 is settled
    run.round(renewal_due=False)
    st = status(sim, cid)
    assert (st["wave"], st["counts"]["active"], st["counts"]["waiting"]) == (1, 5, 15)
    run.round(renewal_due=False)
    assert status(sim, cid)["wave"] == 1  # nothing delivered yet: wave 1 is not settled
    settle(sim, run)
    st = status(sim, cid)
    assert st["state"] == "running"
    assert st["counts"] == {"waiting": 0, "offline": 2, "active": 0, "retry": 0,
                            "done": 17, "failed": 1}
    assert [f["device_id"] for f in st["failed"]] == [stolen]
    assert "rotate refused: rotation not possible here" in st["failed"][0]["reason"]
    assert sorted(st["offline"]) == sorted(offline)
    assert st["rotations"] == {"failed": 1, "old-revoked": 17, "sent": 2}
    waves = {d: m.wave for d, m in members(sim, cid).items()}
    assert [waves[d] for d in ids] == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
    # every device that rotated: new key in use, old certificate revoked, old key erased
    for d in ids:
        dev = sim.devices[d]
        assert dev.rotations == (0 if d in offline | {stolen} else 1)
    # the offline ones come back: the command channel re-sends, they rotate
    sim.come_back(offline)
    settle(sim, run)
    st = status(sim, cid)
    assert st["state"] == "done"
    assert st["counts"]["done"] == 19 and st["counts"]["failed"] == 1
    with Session(sim.engine) as s:
        creds = s.exec(select(Credential).where(col(Credential.device_id).in_(ids))).all()
        active = {c.device_id for c in creds if c.status == CredentialStatus.active}
        revoked = [c for c in creds if c.status == CredentialStatus.revoked]
        assert active == set(ids)  # nobody locked out
        assert len(revoked) == 19
        for c in creds:
            if c.status == CredentialStatus.active and c.device_id != stolen:
                assert c.kid == sim.devices[c.device_id].key.kid.hex()
        acts = list(s.exec(select(AuditRecord.action).where(
            col(AuditRecord.action).startswith("campaign.")).order_by(col(AuditRecord.id))))
    assert acts == ["campaign.create"] + ["campaign.wave"] * 4 + ["campaign.done"]


def test_the_threshold_halts_exactly_when_crossed(sim: SimFleet) -> None:
    ids = sim.add_devices(15, issued=OLD)
    for d in ids[:2]:
        sim.devices[d].refuse = True
    cid = create(sim, wave=5, max_failures="1")
    run = runner(sim)
    settle(sim, run)
    st = status(sim, cid)
    assert st["state"] == "halted" and st["reason"] == "2 failures, 1 allowed"
    assert st["wave"] == 1 and st["counts"]["waiting"] == 10  # wave 2 never started
    assert st["counts"]["done"] == 3 and st["counts"]["failed"] == 2
    for _ in range(3):  # a halted campaign starts nothing, ever
        assert runner(sim).round(renewal_due=False).started == 0
    # the same with one failure: allowed, it runs to the end
    sim2_ids = sim.add_devices(10, site="park", issued=OLD, first=100)
    sim.devices[sim2_ids[0]].refuse = True
    cid2 = create(sim, "site=park", wave=5, max_failures="10%")
    settle(sim, run)
    st = status(sim, cid2)
    assert st["state"] == "done" and st["counts"]["failed"] == 1


def test_pause_resume_abort(sim: SimFleet) -> None:
    ids = sim.add_devices(15, issued=OLD)
    for d in ids[5:10]:
        sim.devices[d].online = False
    cid = create(sim, wave=5, max_failures="5")
    run = runner(sim)
    run.round(renewal_due=False)
    with Session(sim.engine) as s:
        campaign_store.act(s, cid, "pause", by="test")
        s.commit()
    settle(sim, run)  # wave 1 finishes (rotations under way go on), no wave 2
    st = status(sim, cid)
    assert (st["state"], st["wave"], st["counts"]["done"], st["counts"]["waiting"]) == (
        "paused", 1, 5, 10)
    with Session(sim.engine) as s:
        with pytest.raises(CampaignError, match="cannot pause"):
            campaign_store.act(s, cid, "pause", by="test")
        campaign_store.act(s, cid, "resume", by="test")
        s.commit()
    settle(sim, run)
    st = status(sim, cid)
    assert st["wave"] == 3 and st["counts"]["offline"] == 5 and st["counts"]["done"] == 10
    with Session(sim.engine) as s:
        campaign_store.act(s, cid, "abort", by="test")
        s.commit()
    sim.come_back(ids[5:10])
    settle(sim, run)
    st = status(sim, cid)
    assert st["state"] == "aborted"
    assert st["counts"]["done"] == 10 and st["counts"]["failed"] == 5
    assert all("campaign %d aborted" % cid in f["reason"] for f in st["failed"])
    for d in ids[5:10]:
        assert sim.devices[d].rotations == 0  # their rotate commands were cancelled
    with Session(sim.engine) as s, pytest.raises(CampaignError, match="cannot resume"):
        campaign_store.act(s, cid, "resume", by="test")


def test_a_device_never_reached_is_retried_with_backoff(sim: SimFleet) -> None:
    ids = sim.add_devices(3, issued=OLD)
    away = ids[1]
    sim.devices[away].online = False
    cid = create(sim, wave=3, max_failures="0")
    run = runner(sim, retry_base_s=600.0, max_attempts=2)
    settle(sim, run)
    # the rotate command expires undelivered (a day later): the rotation fails "rotate
    # expired", the member waits 600 s and is started again, without counting as failed
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert sim.expire(later) == 1
    run.round(later, renewal_due=False)
    st = status(sim, cid)
    assert st["state"] == "running"
    assert st["counts"]["retry"] == 1 and st["counts"]["failed"] == 0
    run.round(later + dt.timedelta(seconds=599), renewal_due=False)
    assert status(sim, cid)["counts"]["retry"] == 1
    run.round(later + dt.timedelta(seconds=601), renewal_due=False)
    assert status(sim, cid)["counts"]["active"] == 1  # started again, not tried yet
    sim.step()  # tried: the device is still away
    assert status(sim, cid)["counts"]["offline"] == 1
    m = members(sim, cid)[away]
    assert (m.attempts, m.wave) == (2, 1)
    sim.come_back([away])
    settle(sim, run)
    assert status(sim, cid)["state"] == "done"
    with Session(sim.engine) as s:
        rots = s.exec(select(KeyRotation).where(KeyRotation.device_id == away)
                      .order_by(col(KeyRotation.id))).all()
        assert [str(r.state) for r in rots] == ["failed", "old-revoked"]
        assert rots[0].reason.startswith("rotate expired")


def test_selection_preview_confirmation_and_errors(sim: SimFleet) -> None:
    ids = sim.add_devices(6, issued=OLD)
    sim.add_devices(2, site="park", issued=NOW - dt.timedelta(days=95), first=50)  # expired
    with Session(sim.engine) as s:
        from cityedge_fleet.models import Device

        dev = s.get(Device, ids[0])
        assert dev is not None
        set_state(s, device=dev, state=dev.state.__class__("quarantined"))
        s.commit()
        seen = campaign_store.preview(s, campaign_store.policy.parse_selector("all"), NOW)
    assert len(seen.selected) == 5
    assert seen.left_out == {"not active (quarantined)": 1,
                             "certificate expired: needs a technician": 2}
    small = CampaignLimits(confirm_over=4)
    with Session(sim.engine) as s:
        with pytest.raises(CampaignError, match=r"matches 5 devices \(over 4\): look at "
                                                r"the preview"):
            campaign_store.create(s, selector_text="all", wave_size=2, max_failures="0",
                                  by="test", confirmed=False, lim=small)
        with pytest.raises(CampaignError, match="matches no device"):
            campaign_store.create(s, selector_text="site=nowhere", wave_size=2,
                                  max_failures="0", by="test", confirmed=False)
        with pytest.raises(SelectorError, match="unknown key"):
            campaign_store.create(s, selector_text="colour=red", wave_size=2,
                                  max_failures="0", by="test", confirmed=False)
        with pytest.raises(CampaignError, match="wave"):
            campaign_store.create(s, selector_text="all", wave_size=0, max_failures="0",
                                  by="test", confirmed=True)
        camp, _ = campaign_store.create(s, selector_text="all", wave_size=2,
                                        max_failures="50%", by="test", confirmed=True,
                                        lim=small)
        s.commit()
        assert (camp.members, camp.allowed_failures) == (5, 2)


def test_a_device_in_another_rotation_waits_without_spending_a_try(sim: SimFleet) -> None:
    ids = sim.add_devices(2, issued=OLD)
    from cityedge_fleet import rotation

    with Session(sim.engine) as s:
        rotation.start_rotation(s, ids[0], by="operator",
                                signer=command_key.from_settings(sim.settings),
                                lim=sim.settings.limits)
        s.commit()
    sim.devices[ids[0]].online = False
    cid = create(sim, wave=2, max_failures="0")
    runner(sim).round(renewal_due=False)
    m = members(sim, cid)[ids[0]]
    assert (m.status, m.attempts) == ("retry", 0)
    assert "one at a time" in m.reason
    assert status(sim, cid)["state"] == "running"
