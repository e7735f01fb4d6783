"""The Pi gateway's side of an OTA campaign against the real fleet: the app served by
uvicorn over HTTPS (the test PKI), a gateway release uploaded and rolled out by the
campaign runner, the signed ``update`` command's arguments taken by
``cityedge_gateway.ota_command.take_update`` — manifest and key list over TLS, the core's
checks, the real installer's resumable Range download and side-by-side switch into trial —
then commit; a broken release (its trial fails) rolls back. The installer's Range requests
are the ones the fleet served (its progress shows ``downloaded``). With the fleet's
download budget tight, its 429 and ``Retry-After`` slow the gateway's download without
failing the update."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlmodel import Session, col, select

from cityedge_fleet import command_key, ota_store
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import FleetCommand, Role
from cityedge_gateway.ota_command import UpdateRefused, take_update
from cityedge_gateway.ota_download import DONE, RETRY, DownloadEvent, DownloadLimits
from cityedge_gateway.ota_install import CURRENT, Installer

from support.fleet import Api, wait_for
from support.mosquitto import TestPKI, free_port
from support.ota import OtaSimFleet, ReleaseKit, client_fetch
from support.releases import artifact, copy_build, factory_image
from support.rotation import command_args

RM = Role.release_manager


@pytest.fixture
def served(settings: Settings, pki: TestPKI, tmp_path: Path) -> Iterator[tuple[Api, str]]:
    with _serve(settings, pki, tmp_path) as served:
        yield served


@pytest.fixture
def served_on_a_budget(settings: Settings, pki: TestPKI,
                       tmp_path: Path) -> Iterator[tuple[Api, str]]:
    """The fleet with a download budget of 2 requests, then one every 8 s: the manifest
    and the key list take the burst, the artifact's first request is refused 429."""
    settings.limits = settings.limits.model_copy(update={
        "ota_download_requests_burst": 2, "ota_download_requests_per_s": 0.125})
    with _serve(settings, pki, tmp_path) as served:
        yield served


@contextlib.contextmanager
def _serve(settings: Settings, pki: TestPKI, tmp_path: Path) -> Iterator[tuple[Api, str]]:
    from fastapi.testclient import TestClient

    from cityedge_fleet.app import create_app

    kit = ReleaseKit.make(tmp_path)
    port = free_port()
    settings.ota_dir = tmp_path / "ota"
    settings.ota_root_set_file = kit.root_set_file
    settings.ota_public_url = "https://127.0.0.1:%d" % port
    app = create_app(settings, init_db=True)
    app.state.kit = kit
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, ssl_certfile=str(pki.server.cert_pem),
        ssl_keyfile=str(pki.server.key_pem), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 20)
        with TestClient(app) as client:
            yield Api(client, settings), settings.ota_public_url
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.engine.dispose()


def _release(api: Api, kit: ReleaseKit, tmp_path: Path, version: str, seq: int,
             crash: bool = False) -> int:
    body = artifact(version, tmp_path / "starts", crash=crash)
    art = tmp_path / ("gw-%s.tar.gz" % version)
    art.write_bytes(body)
    h = api.headers(RM)
    assert api.client.put("/ota/artifacts", params={"sha256": hashlib.sha256(body)
                                                    .hexdigest()}, content=body,
                          headers=h).status_code == 200
    r = api.client.post("/ota/releases", json=kit.release_body(kit.sign(
        art, version, seq, component="gateway", hw=("pi4",))), headers=h)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _command_for(api: Api, kit: ReleaseKit, release_id: int, device: str) -> Any:
    cid = api.client.post("/ota/campaigns", json={"release": release_id, "select": "all"},
                          headers=api.headers(RM)).json()["id"]
    CampaignRunner(api.engine, api.settings, command_key.from_settings(api.settings),
                   renew=False).round(renewal_due=False)
    with Session(api.engine) as s:
        cmd = s.exec(select(FleetCommand).where(col(FleetCommand.device_id) == device)
                     .order_by(col(FleetCommand.id).desc())).first()
        assert cmd is not None and cmd.name == "update"
        return cid, command_args(cmd)


def _pi4_device(api: Api, kit: ReleaseKit) -> str:
    from cityedge_fleet.models import Device

    sim = OtaSimFleet(api.engine, api.settings, kit, client_fetch(api.client))
    with Session(api.engine) as s:
        dev = sim.add_devices(1, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))[0]
        row = s.get(Device, dev)
        assert row is not None
        row.hardware_class = "pi4"
        s.add(row)
        s.commit()
    return dev


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_gateway_takes_an_update_from_the_fleet_over_https(
        served: tuple[Api, str], pki: TestPKI, tmp_path: Path) -> None:
    api, _url = served
    kit: ReleaseKit = api.client.app.state.kit  # type: ignore[attr-defined]
    dev = _pi4_device(api, kit)
    root = tmp_path / "opt"
    factory_image(root, "1.0.0", 1, tmp_path / "starts")
    inst = Installer(root, build=copy_build)
    roots = kit.root_set_file
    # a good release: downloaded over HTTPS in Range requests, switched into trial, committed
    good = _release(api, kit, tmp_path, "1.1.0", 2)
    cid, args = _command_for(api, kit, good, dev)
    rec = take_update(args, inst, roots_file=roots, hw_class="pi4", ca_file=pki.ca_pem)
    assert (rec.state, rec.version, inst.link(CURRENT)) == ("trial", "1.1.0", "1.1.0")
    with Session(api.engine) as s:
        assert ota_store.status(s, cid, devices=True)["devices"][0]["status"] == "downloaded"
    rec = inst.commit()
    assert (rec.installed_version, rec.installed_sequence) == ("1.1.0", 2)
    # the same command again: the installed sequence is the floor now (replay)
    with pytest.raises(UpdateRefused) as e:
        take_update(args, inst, roots_file=roots, hw_class="pi4", ca_file=pki.ca_pem)
    assert e.value.reason == "replay"
    # another hardware class: refused before anything is fetched beyond the manifest
    broken = _release(api, kit, tmp_path, "1.2.0", 3, crash=True)
    _cid, args = _command_for(api, kit, broken, dev)
    with pytest.raises(UpdateRefused) as e:
        take_update(args, inst, roots_file=roots, hw_class="pi3", ca_file=pki.ca_pem)
    assert e.value.reason == "wrong_hw_class"
    # a broken release goes into trial and is rolled back to 1.1.0
    rec = take_update(args, inst, roots_file=roots, hw_class="pi4", ca_file=pki.ca_pem)
    assert (rec.state, inst.link(CURRENT)) == ("trial", "1.2.0")
    rec = inst.roll_back("health: nothing acknowledged within the deadline")
    assert (rec.state, inst.link(CURRENT), rec.installed_sequence) == ("rolled-back",
                                                                        "1.1.0", 2)
    # a manifest swapped under the command (the digest it names differs): refused
    args[2] = hashlib.sha256(b"another manifest").digest()
    with pytest.raises(UpdateRefused) as e:
        take_update(args, inst, roots_file=roots, hw_class="pi4", ca_file=pki.ca_pem)
    assert e.value.reason == "manifest_digest"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_fleets_download_budget_slows_the_gateway_and_does_not_fail_its_update(
        served_on_a_budget: tuple[Api, str], pki: TestPKI, tmp_path: Path) -> None:
    """The fleet's ``ratelimit.DownloadBudget`` answers the artifact's first request 429
    with ``Retry-After``; the gateway waits that long and asks again within the same
    ``update``: it reaches its trial and the campaign sees the device downloaded."""
    api, _url = served_on_a_budget
    kit: ReleaseKit = api.client.app.state.kit  # type: ignore[attr-defined]
    dev = _pi4_device(api, kit)
    root = tmp_path / "opt"
    factory_image(root, "1.0.0", 1, tmp_path / "starts")
    inst = Installer(root, build=copy_build)
    cid, args = _command_for(api, kit, _release(api, kit, tmp_path, "1.1.0", 2), dev)
    events: list[DownloadEvent] = []
    rec = take_update(args, inst, roots_file=kit.root_set_file, hw_class="pi4",
                      ca_file=pki.ca_pem, bounds=DownloadLimits(retry_first_s=0.1),
                      observe=events.append)
    assert (rec.state, inst.link(CURRENT)) == ("trial", "1.1.0")
    retries = [e for e in events if e.kind == RETRY]
    assert retries and all(e.reason == "rate-limited" for e in retries)
    assert retries[0].wait_s >= 1.0  # the fleet's Retry-After: whole seconds, at least 1
    body = (root / "releases" / "1.1.0" / "VERSION").read_text()
    assert body == "1.1.0\n"
    assert [e.attempt for e in events if e.kind == DONE] == [len(retries) + 1]
    with Session(api.engine) as s:
        assert ota_store.status(s, cid, devices=True)["devices"][0]["status"] == "downloaded"
