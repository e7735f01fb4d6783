"""A campaign end to end over the real broker: real Mosquitto (mTLS, CRL, dynamic
security), the real fleet (API, ingest worker, command publisher, campaign runner) on
SQLite, and fast CPython devices (``cityedge.fastdevice``: the shared core over aiomqtt)
that stream all along. Two of them are away when the campaign starts: the online ones
rotate wave by wave without waiting for them, and they rotate when they come back; no
batch is refused, every old key is erased, the campaign ends ``done``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cityedge_core import chain, topics
from cityedge_fleet import command_key
from cityedge_fleet.campaign import CampaignLimits
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import Role

from support.fastfleet import DeviceLoop, Fleet, enroll_fast, real_fleet
from support.fleet import wait_for
from support.mosquitto import TestPKI
from support.mqtt_probe import WAIT_S

N = 8
AWAY = (2, 5)  # indexes of the devices away during the campaign


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet(db_url, pki, command_absent_retry_s=1.0) as f:
        yield f


def campaign(f: Fleet, cid: int) -> dict[str, object]:
    r = f.api.client.get("/campaigns/%d" % cid, headers=f.api.headers(Role.security))
    assert r.status_code == 200, r.text
    return dict(r.json())


def counts(f: Fleet, cid: int) -> dict[str, int]:
    return campaign(f, cid)["counts"]  # type: ignore[return-value]


def active(f: Fleet) -> int:
    rows = f.api.client.get("/devices?state=active",
                            headers=f.api.headers(Role.viewer)).json()["data"]
    return len(rows)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_campaign_over_fast_devices_with_two_away(fleet: Fleet) -> None:
    f = fleet
    devs = [enroll_fast(f, i + 1)[0] for i in range(N)]
    away = [devs[i] for i in AWAY]
    ing = Ingestor(f.api.engine, f.settings)
    for d in away:  # they streamed once (so they are active), then went away
        d.sign_batch()
        assert ing.handle(topics.up(d.id, topics.READINGS), d.outbox[0]).status == chain.OK
    first = DeviceLoop([d for d in devs if d not in away]).start()
    runner = None
    back = None
    try:
        assert wait_for(lambda: active(f) == N, WAIT_S)  # each has streamed: active
        r = f.api.client.post("/campaigns", json={"select": "site=harbour", "wave": 3,
                                                  "max_failures": "0"},
                              headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        runner = CampaignRunner(f.api.engine, f.settings,
                                command_key.from_settings(f.settings),
                                wake_publisher=f.publisher.wake,
                                clim=CampaignLimits(runner_every_s=0.2), renew=False).start()
        assert wait_for(lambda: counts(f, cid)["done"] == N - len(AWAY), 6 * WAIT_S), \
            counts(f, cid)
        got = campaign(f, cid)
        assert got["state"] == "running" and got["wave"] == 3
        assert sorted(got["offline"]) == sorted(devs[i].id for i in AWAY)  # type: ignore
        # they come back: their rotate commands reach them now
        back = DeviceLoop(away).start()
        assert wait_for(lambda: campaign(f, cid)["state"] == "done", 6 * WAIT_S), \
            counts(f, cid)
        assert counts(f, cid)["done"] == N
        # done = proven (the new key in use, the old certificate revoked); the erase of
        # the old key follows on the device
        assert wait_for(lambda: all(d.stats.erased == 1 for d in devs), WAIT_S)
        assert wait_for(lambda: campaign(f, cid)["rotations"] == {"old-revoked": N}, WAIT_S)
    finally:
        if runner is not None:
            runner.stop()
        if back is not None:
            back.stop()
        first.stop()
    for d in devs:
        assert (d.stats.rotations, d.stats.erased) == (1, 1), d.id
        assert d.stats.refused == 0 and d.stats.forged == 0
        assert len(d.key_slots()) == 1
