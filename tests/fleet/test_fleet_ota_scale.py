"""An OTA campaign over 1,000 devices through the real fleet (SQLite): the app's routes
serve each device's manifest, key list and artifact in Range requests, the campaign runner
queues and signs every ``update`` command, the ingest takes every signed result
(``support.ota``: each device checks the manifest with the core and hashes the artifact).
Waves 1%,10%,100% with an 80% success threshold; 100 devices offline, 25 whose trial fails.
The counts are exact at every step, and the offline devices update when they return."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, func, select

from cityedge_fleet import command_key, ota_store
from cityedge_fleet.app import create_app
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import FleetCommand

from support.ota import OtaSimFleet, ReleaseKit, client_fetch, write_artifact

N = 1000


def drive(sim: OtaSimFleet, run: CampaignRunner, rounds: int = 60) -> int:
    for k in range(rounds):
        out = run.round(renewal_due=False)
        if not out.started and not sim.step():
            return k
    raise AssertionError("still moving after %d rounds" % rounds)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_thousand_devices_in_three_waves(settings: Settings, tmp_path: Path) -> None:
    kit = ReleaseKit.make(tmp_path)
    settings.ota_dir = tmp_path / "ota"
    settings.ota_root_set_file = kit.root_set_file
    settings.ota_public_url = "https://fleet.test"
    app = create_app(settings, init_db=True)
    with TestClient(app) as client:
        engine: Any = app.state.engine
        sim = OtaSimFleet(engine, settings, kit, client_fetch(client))
        ids = sim.add_devices(N, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        broken = [d for i, d in enumerate(ids) if i % 40 == 7]
        away = [d for i, d in enumerate(ids) if i % 10 == 3]
        for d in broken:
            sim.ota[d].breaks = True
        for d in away:
            sim.devices[d].online = False
        art = write_artifact(tmp_path / "fw.bin", 6000)
        with Session(engine) as s:
            up = ota_store.ArtifactUpload(settings, ota_store.hashlib.sha256(
                art.read_bytes()).hexdigest())
            up.feed(art.read_bytes())
            up.finish()
            rel = ota_store.create_release(s, settings, manifest=kit.sign(art, "1.1.0", 2),
                                           key_list=kit.key_list, by="test")
            camp = ota_store.create_campaign(s, settings, release_id=rel.id or 0,
                                             selector_text="all", waves="1%,10%,100%",
                                             success="80%", max_failures="5%", by="test",
                                             confirmed=True)
            s.commit()
            cid = camp.id or 0
        assert camp.waves == [10, 100, 1000]
        run = CampaignRunner(engine, settings, command_key.from_settings(settings),
                             renew=False)
        drive(sim, run)
        with Session(engine) as s:
            st = ota_store.status(s, cid)
        c = {k: v for k, v in st["counts"].items() if v}
        assert st["state"] == "running" and st["wave"] == 3
        assert c == {"committed": 875, "rolled-back": 25, "offline": 100}
        assert len(st["failed"]) == 25 and all(
            f["reason"] == "rolled back: health: the broker was not reached"
            for f in st["failed"])
        # every online device fetched the 6000 bytes in two ranges
        assert {len(sim.ota[d].ranges) for d in ids if d not in away} == {2}
        sim.come_back(away)
        drive(sim, run)
        with Session(engine) as s:
            st = ota_store.status(s, cid)
            sent = s.exec(select(func.count()).select_from(FleetCommand).where(
                col(FleetCommand.name) == "update")).one()
        assert st["state"] == "done"
        assert {k: v for k, v in st["counts"].items() if v} == {"committed": 975,
                                                                "rolled-back": 25}
        assert sent == N  # one update command per device, never two
    app.state.engine.dispose()
