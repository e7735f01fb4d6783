"""OTA end to end with real parts: Mosquitto (mTLS, ACLs), the fleet (API served by
uvicorn over HTTPS with the test PKI's server certificate, ingest worker, command
publisher, campaign runner) on SQLite and PostgreSQL, and fast CPython devices
(``cityedge.fastdevice``) that stream all along and answer the signed ``update`` command
by fetching the release over TLS in Range requests (``cityedge.fastdevice_ota``). A
release uploaded through the API, a two-wave campaign: the first wave's device commits,
then the rest; one device's trial fails and the campaign counts its rollback."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from cityedge_fleet import command_key, ota_store
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.models import Role

from support.fastfleet import DeviceLoop, Fleet, enroll_fast, real_fleet
from support.fleet import wait_for
from support.mosquitto import TestPKI
from support.mqtt_probe import WAIT_S
from support.ota import ReleaseKit, serve_https, write_artifact

RM = Role.release_manager


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet(db_url, pki) as f:
        yield f


@pytest.fixture
def https(fleet: Fleet) -> Iterator[str]:
    """The fleet's app served over HTTPS by uvicorn (the test PKI's server certificate)."""
    with serve_https(fleet.api.client.app, fleet.pki) as url:
        yield url


def test_a_two_wave_campaign_reaches_streaming_devices_over_https(
        fleet: Fleet, https: str, tmp_path: Path) -> None:
    f = fleet
    kit = ReleaseKit.make(tmp_path)
    f.settings.ota_dir = tmp_path / "ota"
    f.settings.ota_root_set_file = kit.root_set_file
    f.settings.ota_public_url = https
    devices = [enroll_fast(f, i)[0] for i in range(1, 4)]
    for d in devices:
        (d.dir / "release-roots.json").write_bytes(kit.root_set_file.read_bytes())
    devices[2].updater.trial_fails = True
    art = write_artifact(tmp_path / "fw.bin", 50_000)
    h = f.api.headers(RM)
    r = f.api.client.put("/ota/artifacts", params={"sha256": hashlib.sha256(
        art.read_bytes()).hexdigest()}, content=art.read_bytes(), headers=h)
    assert r.status_code == 200, r.text
    r = f.api.client.post("/ota/releases", json=kit.release_body(kit.sign(art, "1.4.0", 7)),
                          headers=h)
    assert r.status_code == 201, r.text
    loop = DeviceLoop(devices).start()
    try:
        assert wait_for(lambda: all(d.stats.published >= 2 for d in devices), WAIT_S)
        r = f.api.client.post("/ota/campaigns", json={
            "release": r.json()["id"], "select": "all", "waves": "1,100%",
            "success": "100%", "max_failures": "1"}, headers=h)
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        run = CampaignRunner(f.api.engine, f.settings, command_key.from_settings(f.settings),
                             wake_publisher=f.publisher.wake, renew=False)

        def state() -> dict[str, Any]:
            run.round(renewal_due=False)
            with Session(f.api.engine) as s:
                return ota_store.status(s, cid)

        assert wait_for(lambda: state()["counts"]["committed"] == 1, 3 * WAIT_S)
        st = state()
        assert st["wave"] in (1, 2)
        assert wait_for(lambda: state()["state"] == "done", 3 * WAIT_S), state()
        st = state()
    finally:
        loop.stop()
    c = {k: v for k, v in st["counts"].items() if v}
    assert c == {"committed": 2, "rolled-back": 1}
    assert st["failed"][0]["device_id"] == devices[2].id
    assert st["failed"][0]["reason"] == \
        "rolled back: health: the release did not reach the broker"
    for d in devices[:2]:
        assert d.state["installed_seq"] == 7 and d.state["installed_version"] == "1.4.0"
        assert d.updater.ranges == ["bytes=0-16383", "bytes=16384-32767",
                                    "bytes=32768-49151", "bytes=49152-49999"]
    assert "installed_seq" not in devices[2].state
    assert all(d.stats.forged == 0 and d.stats.refused == 0 for d in devices)
    assert all(d.stats.commands == ["update"] for d in devices)
