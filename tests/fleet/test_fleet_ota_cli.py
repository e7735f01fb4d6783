"""``cityedge ota`` from the command line (SQLite): a release uploaded (artifact into the
store, checked), listed and shown; a refused one with its reason and a hint, no traceback;
a campaign created with waves, its status as text and JSON, paused, resumed, aborted;
every change audited with actor ``cli``."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet.models import AuditRecord
from cityedge_host.crypto import EcSigner

from support import cli
from support.fleet import Api
from support.ota import OtaSimFleet, ReleaseKit, client_fetch, write_artifact


def _cli(api: Api, kit: ReleaseKit, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    s = api.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update({"CITYEDGE_MODE": "development", "CITYEDGE_DATABASE_URL": s.database_url,
                "CITYEDGE_CA_DIR": str(s.ca_dir),
                "CITYEDGE_AUDIT_KEY_FILE": str(s.audit_key_file),
                "CITYEDGE_COMMAND_KEY_FILE": str(s.command_key_file),
                "CITYEDGE_OTA_DIR": str(cwd / "ota"),
                "CITYEDGE_OTA_ROOT_SET_FILE": str(kit.root_set_file),
                "CITYEDGE_OTA_PUBLIC_URL": "https://fleet.test"})
    return cli.run(["ota", *args], env, cwd=cwd)  # in process (support.cli)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_releases_and_a_campaign_from_the_command_line(api: Api, tmp_path: Path) -> None:
    kit = ReleaseKit.make(tmp_path)
    art = write_artifact(tmp_path / "fw.bin", 9000)
    (tmp_path / "m.cose").write_bytes(kit.sign(art, "1.2.0", 3))
    (tmp_path / "k.cose").write_bytes(kit.key_list)
    (tmp_path / "bad.cose").write_bytes(kit.sign(art, "1.2.1", 4, hw=("rp2040",),
                                                 key=EcSigner.generate()))
    files = ["--keys", "k.cose", "--artifact", "fw.bin"]
    r = _cli(api, kit, "release", "upload", "--manifest", "bad.cose", *files, cwd=tmp_path)
    assert r.returncode == 1 and "unknown_key" in r.stderr and "release verify" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(api, kit, "release", "upload", "--manifest", "m.cose", *files, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("release 1: device-firmware 1.2.0 (sequence 3) for esp32")
    r = _cli(api, kit, "release", "list", "--json", cwd=tmp_path)
    assert [x["version"] for x in json.loads(r.stdout)] == ["1.2.0"]
    sim = OtaSimFleet(api.engine, api.settings, kit, client_fetch(api.client))
    sim.add_devices(3, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    r = _cli(api, kit, "campaign", "create", "--release", "1", "--select", "all",
             "--waves", "1,100%", "--success", "100%", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OTA campaign 1: release 1 to 3 devices in waves 1,3" in r.stdout
    r = _cli(api, kit, "campaign", "status", "1", cwd=tmp_path)
    assert "wave 0 of 2 (1,100%)" in r.stdout and "waiting 3" in r.stdout
    r = _cli(api, kit, "campaign", "status", "1", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["counts"]["waiting"] == 3
    assert _cli(api, kit, "campaign", "pause", "1", cwd=tmp_path).stdout.strip() \
        == "OTA campaign 1: paused"
    r = _cli(api, kit, "campaign", "pause", "1", cwd=tmp_path)
    assert r.returncode == 1 and "cannot pause" in r.stderr
    assert _cli(api, kit, "campaign", "resume", "1", cwd=tmp_path).returncode == 0
    assert _cli(api, kit, "campaign", "abort", "1", cwd=tmp_path).stdout.strip() \
        == "OTA campaign 1: aborted"
    with Session(api.engine) as s:
        rows = [(a.actor, a.action, a.outcome) for a in s.exec(select(AuditRecord).where(
            col(AuditRecord.action).startswith("ota.")).order_by(col(AuditRecord.id)))]
    assert rows == [("cli", "ota.release.upload", "refused"),
                    ("cli", "ota.release.upload", "ok"),
                    ("cli", "ota.campaign.create", "ok"),
                    ("cli", "ota.campaign.paused", "ok"),
                    ("cli", "ota.campaign.pause", "refused"),
                    ("cli", "ota.campaign.running", "ok"),
                    ("cli", "ota.campaign.aborted", "ok")]
