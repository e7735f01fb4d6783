"""A campaign over 1,000 devices through the real fleet (campaign runner, rotation,
ingest, CA, command queue; SQLite), each device played in-process with real keys, CSRs,
certificates and signatures (``support.campaign_sim``): 10 % of them offline during the
campaign. Every online device ends rotated, every offline one rotates when it returns,
none is locked out, and the report is exact. A second campaign with injected refusals is
halted by its threshold exactly when it is crossed."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet import campaign_store, command_key
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Credential, CredentialStatus

from support.campaign_sim import SimFleet

N = 1000
OLD = dt.datetime.now(dt.UTC) - dt.timedelta(days=70)


@pytest.fixture
def sim(api_settings_engine: tuple[Settings, Any]) -> SimFleet:
    settings, engine = api_settings_engine
    return SimFleet(engine, settings)


def drive(sim: SimFleet, run: CampaignRunner, rounds: int = 200) -> int:
    for k in range(rounds):
        out = run.round(renewal_due=False)
        delivered = sim.step()
        if not out.started and not delivered:
            return k
    raise AssertionError("still moving after %d rounds" % rounds)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_thousand_devices_with_ten_percent_offline(sim: SimFleet) -> None:
    ids = sim.add_devices(N, issued=OLD)
    offline = set(ids[5::10])  # 100 devices, spread over every wave
    for d in offline:
        sim.devices[d].online = False
    with Session(sim.engine) as s:
        camp, _ = campaign_store.create(s, selector_text="site=harbour,key-age>60d",
                                        wave_size=100, max_failures="5%", by="test",
                                        confirmed=True)
        s.commit()
        cid = camp.id or 0
    run = CampaignRunner(sim.engine, sim.settings, command_key.from_settings(sim.settings),
                         renew=False)
    drive(sim, run)
    with Session(sim.engine) as s:
        st = campaign_store.status(s, cid)
    assert st["state"] == "running" and st["wave"] == 10
    assert st["counts"] == {"waiting": 0, "offline": 100, "active": 0, "retry": 0,
                            "done": 900, "failed": 0}
    assert st["rotations"] == {"old-revoked": 900, "sent": 100}
    assert set(st["offline"]) == offline
    sim.come_back(sorted(offline))
    drive(sim, run)
    with Session(sim.engine) as s:
        st = campaign_store.status(s, cid)
        creds = s.exec(select(Credential).where(col(Credential.device_id).in_(ids))).all()
    assert st["state"] == "done"
    assert st["counts"]["done"] == N and st["rotations"] == {"old-revoked": N}
    active = [c for c in creds if c.status == CredentialStatus.active]
    assert len(active) == N and len(creds) == 2 * N  # one new key each, nobody locked out
    assert {c.kid for c in active} == {sim.devices[d].key.kid.hex() for d in ids}
    assert all(sim.devices[d].rotations == 1 for d in ids)
    assert all(len(sim.devices[d].erased) == 1 for d in ids)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_injected_failures_halt_a_large_campaign_at_the_threshold(sim: SimFleet) -> None:
    ids = sim.add_devices(400, issued=OLD)
    bad = set(ids[150:171])  # 21 refusals in wave 2: over 5% of 400 (20)
    for d in bad:
        sim.devices[d].refuse = True
    with Session(sim.engine) as s:
        camp, _ = campaign_store.create(s, selector_text="all", wave_size=100,
                                        max_failures="5%", by="test", confirmed=True)
        s.commit()
        cid = camp.id or 0
    assert camp.allowed_failures == 20
    run = CampaignRunner(sim.engine, sim.settings, command_key.from_settings(sim.settings),
                         renew=False)
    drive(sim, run)
    with Session(sim.engine) as s:
        st = campaign_store.status(s, cid)
    assert st["state"] == "halted" and st["reason"] == "21 failures, 20 allowed"
    assert st["wave"] == 2  # wave 3 never started
    assert st["counts"] == {"waiting": 200, "offline": 0, "active": 0, "retry": 0,
                            "done": 179, "failed": 21}
    assert {f["device_id"] for f in st["failed"]} == bad
