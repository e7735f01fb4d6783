"""OTA releases and campaigns through the real fleet app (SQLite and PostgreSQL): the
release manager role, the artifact store, the checks at upload (each an attack that must
be refused), the devices' downloads with Range, and a two-wave campaign whose devices
(``support.ota``: real signatures, real HTTP routes, the real ingest) commit, roll back
and come back from offline, with exact counts."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_core import update_manifest
from cityedge_fleet import command_key, command_queue, ota_store
from cityedge_fleet.campaign import CampaignLimits
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import AuditRecord, FleetCommand, Role
from cityedge_host.crypto import EcSigner

from support.fleet import Api
from support.ota import OtaSimFleet, ReleaseKit, client_fetch, write_artifact

PUBLIC = "https://fleet.test:8443"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def kit(tmp_path: Path) -> ReleaseKit:
    return ReleaseKit.make(tmp_path)


@pytest.fixture
def ota_settings(settings: Settings, kit: ReleaseKit, tmp_path: Path) -> Settings:
    settings.ota_dir = tmp_path / "ota"
    settings.ota_root_set_file = kit.root_set_file
    settings.ota_public_url = PUBLIC
    settings.limits.ota_max_sequence_jump = 100
    return settings


@pytest.fixture
def oapi(ota_settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    from cityedge_fleet.app import create_app

    app = create_app(ota_settings, init_db=True)
    with TestClient(app) as client:
        yield Api(client, ota_settings)
    app.state.engine.dispose()


RM = Role.release_manager


def put_artifact(api: Api, path: Path, role: Role = RM, sha: str | None = None) -> Any:
    data = path.read_bytes()
    return api.client.put("/ota/artifacts", params={"sha256": sha or hashlib.sha256(
        data).hexdigest()}, content=data, headers=api.headers(role))


def upload(api: Api, kit: ReleaseKit, tmp_path: Path, version: str = "1.1.0",
           seq: int = 2, size: int = 20_000, **kw: Any) -> Any:
    art = write_artifact(tmp_path / ("art-%s" % version), size, seed=seq)
    assert put_artifact(api, art).status_code == 200
    manifest = kit.sign(art, version, seq, **kw)
    return api.client.post("/ota/releases", json=kit.release_body(manifest),
                           headers=api.headers(RM))


# ----------------------------------------------------------------------------- roles


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_only_the_release_manager_uploads_releases_and_runs_campaigns(
        oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    art = write_artifact(tmp_path / "a", 1000)
    manifest = kit.sign(art, "1.1.0", 2)
    for role in (Role.technician, Role.security, Role.viewer, Role.vendor):
        assert put_artifact(oapi, art, role).status_code == 403
        assert oapi.client.post("/ota/releases", json=kit.release_body(manifest),
                                headers=oapi.headers(role)).status_code == 403
        assert oapi.client.post("/ota/campaigns", json={"release": 1, "select": "all"},
                                headers=oapi.headers(role)).status_code == 403
        assert oapi.client.get("/ota/releases", headers=oapi.headers(role)
                               ).status_code == 403
    assert not (tmp_path / "ota" / "artifacts").exists() or not any(
        (tmp_path / "ota" / "artifacts").iterdir())
    # and the release manager may do nothing else: no commands, no key campaigns
    h = oapi.headers(RM)
    assert oapi.client.post("/campaigns", json={"select": "all"}, headers=h
                            ).status_code == 403
    assert oapi.client.post("/devices/x/commands", json={"name": "status"}, headers=h
                            ).status_code == 403
    assert put_artifact(oapi, art).status_code == 200
    with Session(oapi.engine) as s:
        denied = s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "auth.forbidden")).all()
    assert len(denied) >= 16


# ------------------------------------------------------------------------ releases


def test_a_release_is_checked_and_stored_with_its_artifact(oapi: Api, kit: ReleaseKit,
                                                           tmp_path: Path) -> None:
    r = upload(oapi, kit, tmp_path)
    assert r.status_code == 201, r.text
    rel = r.json()
    assert (rel["component"], rel["version"], rel["sequence"], rel["size"]) == (
        "device-firmware", "1.1.0", 2, 20_000)
    assert rel["kid"] == kit.key.kid.hex() and rel["keys_version"] == 1
    stored = tmp_path / "ota" / "artifacts" / rel["sha256"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == rel["sha256"]
    listed = oapi.client.get("/ota/releases", headers=oapi.headers(RM)).json()
    assert [x["id"] for x in listed] == [rel["id"]]
    # the same component and sequence again: 409
    assert upload(oapi, kit, tmp_path, "1.1.1", 2).status_code == 409


def test_attack_a_technician_or_device_token_uploading_a_release_is_403(
        oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    art = write_artifact(tmp_path / "a", 500)
    for role in (Role.technician, Role.security):
        assert put_artifact(oapi, art, role).status_code == 403
        r = oapi.client.post("/ota/releases", json=kit.release_body(kit.sign(art, "2.0", 3)),
                             headers=oapi.headers(role))
        assert r.status_code == 403
    r = oapi.client.put("/ota/artifacts", params={"sha256": "0" * 64}, content=b"x")
    assert r.status_code == 401  # a device has no API token at all
    with Session(oapi.engine) as s:
        assert s.exec(select(ota_store.OtaRelease)).all() == []


def test_attack_a_manifest_not_signed_by_a_certified_release_key_is_refused(
        oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    art = write_artifact(tmp_path / "a", 500)
    assert put_artifact(oapi, art).status_code == 200
    stranger = EcSigner.generate()  # e.g. the fleet's stolen command key
    r = oapi.client.post("/ota/releases", json=kit.release_body(
        kit.sign(art, "2.0", 3, key=stranger)), headers=oapi.headers(RM))
    assert r.status_code == 422 and "unknown_key" in r.text
    # a key list signed by one root only (the threshold is 2)
    from cityedge_host import release
    from cityedge_host.crypto import public_sec1

    one = release.certify(kit.root_set, kit.roots[:1], [release.CertifiedKey(
        public_sec1(stranger.public_key), ["device-firmware"], kit.expires)], 5)
    r = oapi.client.post("/ota/releases", json=kit.release_body(
        kit.sign(art, "2.0", 3, key=stranger), one), headers=oapi.headers(RM))
    assert r.status_code == 422 and "keys_threshold" in r.text
    # an expired manifest (freeze)
    r = oapi.client.post("/ota/releases", json=kit.release_body(
        kit.sign(art, "2.0", 3, expires=int(NOW.timestamp()) - 10)),
        headers=oapi.headers(RM))
    assert r.status_code == 422 and "expired" in r.text
    with Session(oapi.engine) as s:
        assert s.exec(select(ota_store.OtaRelease)).all() == []
        refused = s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "ota.release.upload")).all()
    assert [a.outcome for a in refused] == ["refused"] * 3


def test_attack_an_artifact_whose_hash_differs_is_refused(oapi: Api, kit: ReleaseKit,
                                                           tmp_path: Path) -> None:
    art = write_artifact(tmp_path / "a", 5000)
    r = put_artifact(oapi, art, sha="ab" * 32)
    assert r.status_code == 422 and "not kept" in r.text
    assert not any((tmp_path / "ota" / "artifacts").iterdir())  # no file, no temp file
    # a manifest naming an artifact the store does not hold
    r = oapi.client.post("/ota/releases", json=kit.release_body(kit.sign(art, "2.0", 3)),
                         headers=oapi.headers(RM))
    assert r.status_code == 409 and "upload it first" in r.text
    # the stored file tampered with on disk after the upload
    assert put_artifact(oapi, art).status_code == 200
    stored = tmp_path / "ota" / "artifacts" / hashlib.sha256(art.read_bytes()).hexdigest()
    stored.write_bytes(b"X" + art.read_bytes()[1:])
    r = oapi.client.post("/ota/releases", json=kit.release_body(kit.sign(art, "2.0", 3)),
                         headers=oapi.headers(RM))
    assert r.status_code == 422 and "artifact_digest" in r.text


def test_attack_an_artifact_over_the_size_limit_is_413_and_not_kept(
        oapi: Api, tmp_path: Path) -> None:
    oapi.settings.limits.ota_artifact_max_bytes = 10_000
    art = write_artifact(tmp_path / "a", 10_001)
    r = put_artifact(oapi, art)
    assert r.status_code == 413
    assert not (tmp_path / "ota" / "artifacts").exists() or not any(
        (tmp_path / "ota" / "artifacts").iterdir())


def test_attack_a_sequence_jump_over_the_cap_is_refused(oapi: Api, kit: ReleaseKit,
                                                        tmp_path: Path) -> None:
    r = upload(oapi, kit, tmp_path, "9.0.0", 101)  # from nothing: 101 > 100
    assert r.status_code == 422 and "at most 100" in r.text
    assert upload(oapi, kit, tmp_path, "1.0.0", 100).status_code == 201
    r = upload(oapi, kit, tmp_path, "9.0.1", 201)
    assert r.status_code == 422 and "sequence 201 is 101 above" in r.text
    assert upload(oapi, kit, tmp_path, "1.0.1", 200).status_code == 201


def test_no_root_set_no_release(oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    oapi.settings.ota_root_set_file = None
    r = upload(oapi, kit, tmp_path)
    assert r.status_code == 503 and "no root set" in r.text


def test_an_update_command_is_queued_only_by_an_ota_campaign(
        oapi: Api, kit: ReleaseKit, ota_settings: Settings) -> None:
    sim = OtaSimFleet(oapi.engine, oapi.settings, kit, client_fetch(oapi.client))
    dev = sim.add_devices(1, issued=NOW - dt.timedelta(days=1))[0]
    with Session(oapi.engine) as s, pytest.raises(command_queue.CommandError,
                                                  match="OTA campaign only"):
        command_queue.queue(s, signer=command_key.from_settings(ota_settings),
                                device_id=dev, name="update", args={"1": "https://x/"},
                                expires_in_s=60, created_by="t", lim=ota_settings.limits)


# ---------------------------------------------------------------------------- campaign


def _runner(api: Api) -> CampaignRunner:
    return CampaignRunner(api.engine, api.settings, command_key.from_settings(api.settings),
                          clim=CampaignLimits(), renew=False)


def _settle(sim: OtaSimFleet, run: CampaignRunner, rounds: int = 20) -> None:
    for _ in range(rounds):
        out = run.round(renewal_due=False)
        if not sim.step() and not out.started:
            run.round(renewal_due=False)
            return


def _status(api: Api, cid: int, devices: bool = False) -> dict[str, Any]:
    r = api.client.get("/ota/campaigns/%d" % cid, params={"devices": devices},
                       headers=api.headers(RM))
    assert r.status_code == 200, r.text
    return r.json()


def test_a_two_wave_campaign_commits_rolls_back_and_waits_for_offline_devices(
        oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    rel = upload(oapi, kit, tmp_path, size=30_000).json()
    sim = OtaSimFleet(oapi.engine, oapi.settings, kit, client_fetch(oapi.client))
    ids = sim.add_devices(10, issued=NOW - dt.timedelta(days=1))
    sim.add_devices(2, issued=NOW - dt.timedelta(days=1), first=100, site="elsewhere")
    sim.ota[ids[3]].breaks = True  # in wave 2: its trial fails, it rolls back
    sim.devices[ids[7]].online = False  # away during wave 2
    r = oapi.client.post("/ota/campaigns", json={
        "release": rel["id"], "select": "site=harbour", "waves": "20%,100%",
        "success": "100%", "max_failures": "2"}, headers=oapi.headers(RM))
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    assert r.json()["waves"] == [2, 10] and r.json()["members"] == 10
    run = _runner(oapi)
    run.round(renewal_due=False)
    st = _status(oapi, cid)
    assert (st["wave"], st["counts"]["pending"], st["counts"]["waiting"]) == (1, 2, 8)
    _settle(sim, run)
    st = _status(oapi, cid, devices=True)
    assert st["wave"] == 2 and st["state"] == "running"
    c = st["counts"]
    assert (c["committed"], c["rolled-back"], c["offline"], c["waiting"]) == (8, 1, 1, 0)
    assert st["failed"] == [{"device_id": ids[3], "wave": 2, "status": "rolled-back",
                             "reason": "rolled back: health: the broker was not reached"}]
    # every committed device fetched the artifact by ranges; nobody outside was asked
    assert all(sim.ota[d].ranges[0] == "bytes=0-4095" for d in ids if d not in (ids[7],))
    assert sim.ota[ids[0]].installed_seq == 2
    assert all(not sim.ota[d].ranges for d in sim.ota if d not in ids)
    # the offline device comes back: it gets its update, the campaign is done
    sim.come_back([ids[7]])
    _settle(sim, run)
    st = _status(oapi, cid)
    assert st["state"] == "done"
    assert (st["counts"]["committed"], st["counts"]["rolled-back"]) == (9, 1)


def test_an_injected_failure_rate_halts_the_campaign(oapi: Api, kit: ReleaseKit,
                                                      tmp_path: Path) -> None:
    rel = upload(oapi, kit, tmp_path).json()
    sim = OtaSimFleet(oapi.engine, oapi.settings, kit, client_fetch(oapi.client))
    ids = sim.add_devices(20, issued=NOW - dt.timedelta(days=1))
    for d in ids[:4]:  # the whole first wave breaks
        sim.ota[d].breaks = True
    cid = oapi.client.post("/ota/campaigns", json={
        "release": rel["id"], "select": "all", "waves": "4,100%", "success": "50%",
        "max_failures": "10%"}, headers=oapi.headers(RM)).json()["id"]
    run = _runner(oapi)
    _settle(sim, run)
    st = _status(oapi, cid)
    assert st["state"] == "halted" and st["reason"].startswith("4 failures")
    assert (st["counts"]["rolled-back"], st["counts"]["waiting"]) == (4, 16)
    with Session(oapi.engine) as s:
        cmds = s.exec(select(FleetCommand).where(col(FleetCommand.name) == "update")).all()
    assert len(cmds) == 4  # nothing past the first wave was ever sent


def test_pause_resume_and_abort(oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    rel = upload(oapi, kit, tmp_path).json()
    sim = OtaSimFleet(oapi.engine, oapi.settings, kit, client_fetch(oapi.client))
    ids = sim.add_devices(6, issued=NOW - dt.timedelta(days=1))
    for d in ids[2:]:
        sim.devices[d].online = False
    cid = oapi.client.post("/ota/campaigns", json={
        "release": rel["id"], "select": "all", "waves": "2,4,6", "success": "100%"},
        headers=oapi.headers(RM)).json()["id"]
    h = oapi.headers(RM)
    assert oapi.client.post("/ota/campaigns/%d/pause" % cid, headers=h).json()["state"] \
        == "paused"
    run = _runner(oapi)
    run.round(renewal_due=False)
    assert _status(oapi, cid)["counts"]["waiting"] == 6  # paused: nothing started
    assert oapi.client.post("/ota/campaigns/%d/pause" % cid, headers=h).status_code == 409
    assert oapi.client.post("/ota/campaigns/%d/resume" % cid, headers=h).status_code == 200
    _settle(sim, run)
    st = _status(oapi, cid)
    assert (st["wave"], st["counts"]["committed"], st["counts"]["offline"]) == (2, 2, 2)
    st = oapi.client.post("/ota/campaigns/%d/abort" % cid, headers=h).json()
    assert st["state"] == "aborted"
    assert (st["counts"]["committed"], st["counts"]["missed"], st["counts"]["waiting"]) \
        == (2, 2, 2)
    assert oapi.client.post("/ota/campaigns/%d/resume" % cid, headers=h).status_code == 409


# ---------------------------------------------------------------------------- delivery


def _campaign_with_tokens(oapi: Api, kit: ReleaseKit, tmp_path: Path, n: int = 2
                          ) -> tuple[OtaSimFleet, list[str], dict[str, str], int]:
    rel = upload(oapi, kit, tmp_path, size=10_000).json()
    sim = OtaSimFleet(oapi.engine, oapi.settings, kit, client_fetch(oapi.client))
    ids = sim.add_devices(n, issued=NOW - dt.timedelta(days=1))
    oapi.client.post("/ota/campaigns", json={"release": rel["id"], "select": "all"},
                     headers=oapi.headers(RM))
    _runner(oapi).round(renewal_due=False)
    from support.rotation import command_args

    urls = {}
    with Session(oapi.engine) as s:
        for c in s.exec(select(FleetCommand).where(col(FleetCommand.name) == "update")):
            url, _d = update_manifest.update_args(command_args(c))
            urls[c.device_id] = url[len(PUBLIC):]
    return sim, ids, urls, rel["size"]


def test_attack_a_device_asking_for_another_devices_manifest(oapi: Api, kit: ReleaseKit,
                                                             tmp_path: Path) -> None:
    _sim, ids, urls, _size = _campaign_with_tokens(oapi, kit, tmp_path)
    assert len(set(urls.values())) == 2  # one capability per device
    assert oapi.client.get(urls[ids[0]] + "manifest").status_code == 200
    # a device knows its own URL; another's token is 128 random bits it never saw:
    # guesses, its own token altered, and listing are all 404
    own = urls[ids[0]].split("/")[3]
    for token in (own[:-1] + ("A" if own[-1] != "A" else "B"), "A" * 22, "x" * 64):
        for f in ("manifest", "keys", "artifact"):
            assert oapi.client.get("/ota/d/%s/%s" % (token, f)).status_code == 404
    assert oapi.client.get("/ota/d/").status_code == 404
    assert oapi.client.get("/ota/releases").status_code == 401
    with Session(oapi.engine) as s:  # the database keeps only the tokens' digests
        hashes = {m.token_hash for m in s.exec(select(ota_store.OtaMember))}
    assert own not in hashes and hashlib.sha256(own.encode()).hexdigest() in hashes


def test_attack_range_abuse_is_bounded(oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    _sim, ids, urls, size = _campaign_with_tokens(oapi, kit, tmp_path, n=1)
    art = urls[ids[0]] + "artifact"
    whole = oapi.client.get(art)
    assert whole.status_code == 200 and len(whole.content) == size
    r = oapi.client.get(art, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.headers["content-range"] == "bytes 100-199/%d" % size
    assert r.content == whole.content[100:200]
    r = oapi.client.get(art, headers={"Range": "bytes=0-999999999999999"})  # huge: cut
    assert r.status_code == 206 and len(r.content) == size
    r = oapi.client.get(art, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == whole.content[-10:]
    for bad in ("bytes=-0", "bytes=%d-" % size, "bytes=5-1", "bytes=-5-10",
                "bytes=0-10,5-20", "bytes=0-1,2-3,4-5", "items=0-1", "bytes=1234567890123456-",
                "bytes=", "bytes=--1"):
        r = oapi.client.get(art, headers={"Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == "bytes */%d" % size
        assert len(r.content) < 200


def _throttled(what: str) -> float:
    from cityedge_fleet.instruments import INSTRUMENTS

    return INSTRUMENTS.get_sample_value("cityedge_fleet_ota_download_throttled_total",
                                        {"what": what}) or 0.0


def test_attack_one_device_cannot_exhaust_the_download_endpoints(
        oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    """A device with its own valid capability hammers the manifest and the artifact: past
    its request budget and then past its byte budget it gets 429 with Retry-After (counted
    in the metrics), while another device is served all along; waiting as told admits it
    again (the budget slows a device, never locks it out)."""
    from cityedge_fleet.ratelimit import DownloadBudget

    _sim, ids, urls, size = _campaign_with_tokens(oapi, kit, tmp_path, n=2)
    now = [0.0]
    oapi.client.app.state.download_budget = DownloadBudget(  # type: ignore[attr-defined]
        requests_burst=6, requests_per_s=1.0, bytes_burst=3 * size, bytes_per_s=size / 2,
        max_devices=100, clock=lambda: now[0])
    hog, other = urls[ids[0]], urls[ids[1]]
    requests_before, bytes_before = _throttled("requests"), _throttled("bytes")
    for _ in range(6):
        assert oapi.client.get(hog + "keys").status_code == 200
    r = oapi.client.get(hog + "manifest")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert oapi.client.get(hog + "artifact", headers={"Range": "bytes=0-9"}).status_code == 429
    assert _throttled("requests") == requests_before + 2
    assert oapi.client.get(other + "manifest").status_code == 200  # the others are served
    assert oapi.client.get(other + "artifact").status_code == 200
    # bytes: whole artifacts until the bucket is overdrawn by one response
    now[0] += 10.0  # the request bucket is full again (6)
    served = 0
    while (r := oapi.client.get(hog + "artifact")).status_code == 200:
        served += len(r.content)
    assert r.status_code == 429 and served <= 4 * size + 2 * 1024  # burst + one response
    assert int(r.headers["retry-after"]) >= 1
    assert _throttled("bytes") == bytes_before + 1
    assert oapi.client.get(other + "artifact").status_code == 200
    now[0] += int(r.headers["retry-after"])  # waiting as told admits it again
    r = oapi.client.get(hog + "artifact", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and len(r.content) == 100
    # a refused range costs a request too: it cannot be used to probe for free
    now[0] += 100.0
    codes = [oapi.client.get(hog + "artifact", headers={"Range": "bytes=5-1"}).status_code
             for _ in range(8)]
    assert codes == [416] * 6 + [429] * 2


def test_attack_one_device_is_one_vote_toward_a_waves_threshold_and_its_halt(
        oapi: Api, kit: ReleaseKit, tmp_path: Path) -> None:
    """A campaign whose first wave is one device (``1,100%``, success 100%, one failure
    allowed). A device can move the campaign by its own member's first result only:
    results it signs for another device (naming it, or on its topic), for a seq it was
    never sent, and its own result repeated or contradicted later count for nothing. So
    a forging or babbling device advances a wave by at most its own commit and halts a
    campaign by at most its own failure (``ota.decide`` counts members, and
    ``acceptance.answered`` keeps a command's first result)."""
    from cityedge_core import command, topics

    from support.campaign_sim import SimDevice

    rel = upload(oapi, kit, tmp_path).json()
    sim = OtaSimFleet(oapi.engine, oapi.settings, kit, client_fetch(oapi.client))
    ids = sim.add_devices(4, issued=NOW - dt.timedelta(days=1))
    cid = oapi.client.post("/ota/campaigns", json={
        "release": rel["id"], "select": "all", "waves": "1,100%", "success": "100%",
        "max_failures": "1"}, headers=oapi.headers(RM)).json()["id"]
    run = _runner(oapi)

    def result(by: SimDevice, names: str, seq: int, outcome: str, topic_of: str = "",
               state: str = "") -> tuple[str, bytes]:
        return (topics.up(topic_of or by.id, topics.RESULT),
                command.encode_result(by.key, by.key.kid, "update", names, seq, outcome,
                                      "", {"state": state} if state else None))

    def feed(*msgs: tuple[str, bytes]) -> None:
        run.round(renewal_due=False)
        sim.ingest.handle_many(list(msgs))
        run.round(renewal_due=False)

    run.round(renewal_due=False)
    first = sim.publish()  # wave 1: one member's command is out
    assert len(first) == 1
    voter = first[0].device_id
    others = [sim.devices[d] for d in ids if d != voter]
    seq = first[0].seq
    # other devices forge the voter's commit: naming it, on its topic, or for its seq
    feed(result(others[0], voter, seq, "ok"),
         result(others[0], voter, seq, "ok", topic_of=voter),
         result(others[1], others[1].id, seq, "ok"))
    st = _status(oapi, cid)
    assert (st["wave"], st["counts"]["committed"], st["state"]) == (1, 0, "running")
    # the voter commits, then says so again and again, then claims a rollback
    v = sim.devices[voter]
    feed(*[result(v, voter, seq, "ok")] * 5,
         *[result(v, voter, seq, "failed", state="rolled-back")] * 3)
    st = _status(oapi, cid)
    assert st["counts"]["committed"] == 1 and st["counts"]["rolled-back"] == 0
    assert (st["wave"], st["state"]) == (2, "running")  # its one vote, counted once
    second = {c.device_id: c for c in sim.publish()}
    assert set(second) == {d.id for d in others}
    # wave 2: the committed voter cannot commit for the others, nor fail them
    a, b, c = others
    feed(result(v, a.id, second[a.id].seq, "ok", topic_of=a.id),
         result(v, b.id, second[b.id].seq, "failed", topic_of=b.id, state="rolled-back"))
    st = _status(oapi, cid)
    assert (st["counts"]["committed"], st["counts"]["rolled-back"], st["state"]) == (
        1, 0, "running")
    # one device's rollback, repeated, is one failure (one allowed): no halt
    feed(*[result(a, a.id, second[a.id].seq, "failed", state="rolled-back")] * 4)
    st = _status(oapi, cid)
    assert (st["counts"]["rolled-back"], st["state"]) == (1, "running")
    # a second device's own failure is the second vote: over the limit, halted
    feed(result(b, b.id, second[b.id].seq, "failed", state="rolled-back"))
    st = _status(oapi, cid)
    assert (st["counts"]["rolled-back"], st["state"]) == (2, "halted")
    assert c.id not in {f["device_id"] for f in st["failed"]}
