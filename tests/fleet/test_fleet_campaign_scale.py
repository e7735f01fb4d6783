"""A large campaign with injected failures through the real fleet (campaign runner,
rotation, ingest, CA, command queue; SQLite), each device played in-process with real
keys, CSRs, certificates and signatures (``support.campaign_sim``): refusals injected in
its second wave halt it by its threshold exactly when it is crossed, and the next wave
never starts. (The 1,000-device campaign with a tenth offline runs over the real broker:
``tests/firmware/test_campaign_1000_e2e.py``.)"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlmodel import Session

from cityedge_fleet import campaign_store, command_key
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings

from support.campaign_sim import SimFleet

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
