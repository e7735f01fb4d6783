"""An OTA campaign from the real fleet to the real gateway process, end to end: Mosquitto
with mTLS and the fleet's CRL; the fleet on SQLite (API served over HTTPS by uvicorn,
ingest worker, command publisher, campaign runner); the gateway enrolled through
``/enroll`` and run as systemd runs it (``support.systemd_sim``: the unit's boot guard and
``current/bin/cityedge gateway run``, restarted on a non-zero exit).

The release manager uploads a gateway release and starts a campaign; the gateway takes
the signed ``update`` command (manifest and key list over TLS, the core's checks, the
Range download, the side-by-side switch), keeps it *answered later*, exits 75 and is
started again in the new release, whose trial (its beacon batch acknowledged) commits and
answers ``ok``: the campaign ends ``committed``. A broken release (it crashes at every
start) is rolled back by the boot guard; the previous release answers the command at its
start, ``failed`` with ``{"state": "rolled-back"}``: the campaign counts it rolled back.
The fleet re-sends a command until it has its answer (every second here): a command in
progress is not run again (one start per release in the starts log) and gets one result.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet import command_key, ota_store
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.models import FleetCommand, Role
from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_install import EXIT_RESTART, Installer

from support.fastfleet import Fleet, real_fleet
from support.fleet import wait_for
from support.gateway import GW
from support.gateway_enroll import enroll_gateway
from support.mosquitto import TestPKI
from support.ota import ReleaseKit, serve_https
from support.pty import Sds011Stream
from support.releases import artifact, factory_image
from support.systemd_sim import ServiceSim

UNIT = Path(__file__).resolve().parents[2] / "gateway" / "cityedge-gateway.service"
RM = Role.release_manager
HW = "rpi4"  # the hardware class enrollment gives the gateway (``gateway_enroll``)
WAIT_S = 90.0

UPDATE = """
[update]
root = "%s"
trial_deadline_s = 30
trial_max_starts = 2
release_roots = "%s"
hw_class = "%s"
build = "copy"

[[serial]]
name = "pm"
port = "%s"
protocol = "sds011"
"""


@pytest.fixture
def fleet(tmp_path: Path, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet("sqlite:///%s" % (tmp_path / "fleet.sqlite3"), pki,
                    command_resend_s=1.0, command_absent_retry_s=0.5) as f:
        yield f


def upload(f: Fleet, kit: ReleaseKit, tmp_path: Path, version: str, seq: int,
           starts: Path, crash: bool = False) -> int:
    body = artifact(version, starts, crash=crash)
    art = tmp_path / ("gw-%s.tar.gz" % version)
    art.write_bytes(body)
    h = f.api.headers(RM)
    r = f.api.client.put("/ota/artifacts", params={"sha256": hashlib.sha256(body).hexdigest()},
                         content=body, headers=h)
    assert r.status_code == 200, r.text
    r = f.api.client.post("/ota/releases", json=kit.release_body(kit.sign(
        art, version, seq, component="gateway", hw=(HW,))), headers=h)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def run_campaign(f: Fleet, release: int, until: str) -> dict[str, Any]:
    r = f.api.client.post("/ota/campaigns", json={"release": release, "select": "all"},
                          headers=f.api.headers(RM))
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    runner = CampaignRunner(f.api.engine, f.settings, command_key.from_settings(f.settings),
                            wake_publisher=f.publisher.wake, renew=False)

    def state() -> dict[str, Any]:
        runner.round(renewal_due=False)
        with Session(f.api.engine) as session:
            return ota_store.status(session, cid, devices=True)

    wait_for(lambda: state()["counts"].get(until, 0) == 1, WAIT_S)
    return state()


def device_state(f: Fleet) -> str:
    r = f.api.client.get("/devices/%s" % GW, headers=f.api.headers(Role.technician))
    return str(r.json()["state"])


def results(f: Fleet) -> list[FleetCommand]:
    with Session(f.api.engine) as session:
        return list(session.exec(select(FleetCommand).where(
            col(FleetCommand.name) == "update").order_by(col(FleetCommand.id))))


def test_an_ota_campaign_updates_the_running_gateway_and_a_broken_release_rolls_back(
        fleet: Fleet, pki: TestPKI, tmp_path: Path) -> None:
    f = fleet
    kit = ReleaseKit.make(tmp_path)
    f.settings.ota_dir = tmp_path / "ota"
    f.settings.ota_root_set_file = kit.root_set_file
    with serve_https(f.api.client.app, pki) as url:
        f.settings.ota_public_url = url
        config, _key, _ = enroll_gateway(
            f.api, tmp_path / "gw", 901, f.broker.port, pki.ca_pem,
            'key_file = "gateway.key"\nbatch_readings = 5\nbatch_max_age_s = 0.5')
        root, starts = tmp_path / "opt-cityedge", tmp_path / "starts.log"
        root.mkdir()
        factory_image(root, "1.0.0", 1, starts)
        roots = config.parent / "release-roots.json"
        roots.write_bytes(kit.root_set_file.read_bytes())
        with config.open("a") as out:
            out.write(UPDATE % (root, roots, HW, tmp_path / "ttyPM"))
        log = tmp_path / "service.log"
        sensor = Sds011Stream(tmp_path / "ttyPM").start()
        sim = ServiceSim(UNIT, {"/opt/cityedge": str(root),
                                "/etc/cityedge/gateway.toml": str(config)}, log).start()
        try:
            # streaming: its first batch makes the gateway active, a campaign's member
            assert wait_for(lambda: device_state(f) == "active", WAIT_S), log.read_text()
            # a good release: taken, restarted into, committed, answered ok
            good = upload(f, kit, tmp_path, "1.1.0", 2, starts)
            st = run_campaign(f, good, "committed")
            assert st["counts"]["committed"] == 1, (st, log.read_text()[-4000:])
            rec = Installer(root).record()
            assert (rec.state, rec.installed_version, rec.installed_sequence) == (
                s.COMMITTED, "1.1.0", 2)
            assert os.readlink(root / "current").endswith("1.1.0")
            # a broken release: crashes at every start, rolled back by the boot guard; the
            # previous release answers the command at its start
            broken = upload(f, kit, tmp_path, "1.2.0", 3, starts, crash=True)
            st = run_campaign(f, broken, "rolled-back")
            assert st["counts"]["rolled-back"] == 1, (st, log.read_text()[-4000:])
            assert st["devices"][0]["reason"] == \
                "rolled back: 2 starts in trial without a commit (limit 2)"
            rec = Installer(root).record()
            assert (rec.state, rec.installed_sequence) == (s.ROLLED_BACK, 2)
            assert os.readlink(root / "current").endswith("1.1.0")
        finally:
            sim.stop()
            sensor.stop()
    started = [line.split()[0] + (" crash" if line.endswith("crash") else "")
               for line in starts.read_text().splitlines()]
    assert started == ["1.0.0", "1.1.0", "1.2.0 crash", "1.2.0 crash", "1.1.0"]
    assert sim.exits == [EXIT_RESTART, EXIT_RESTART, 3, 3]
    # each command answered by the signed result of its trial's outcome
    cmds = results(f)
    assert [(c.state, c.result_detail) for c in cmds] == [
        ("ok", "committed"), ("failed", "2 starts in trial without a commit (limit 2)")]
