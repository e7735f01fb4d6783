"""Campaigns over HTTP and from ``cityedge keys``: preview, create (a large selection only
when confirmed), progress, pause/resume/abort, the key report; security and admin only;
every action and refusal audited with who did it. (Every other role's 403 on these routes
is ``test_fleet_auth``'s walk of the schema; their answers' shapes ``test_fleet_schemathesis``.)"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import select as io_select
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet import command_key
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.models import AuditRecord, Role

from support import cli
from support.campaign_sim import SimFleet
from support.fleet import Api

OLD = dt.datetime.now(dt.UTC) - dt.timedelta(days=70)


def audits(api: Api, prefix: str) -> list[tuple[str, str, str]]:
    with Session(api.engine) as s:
        return [(a.action, a.outcome, a.actor) for a in s.exec(
            select(AuditRecord).where(col(AuditRecord.action).startswith(prefix))
            .order_by(col(AuditRecord.id)))]


def test_campaign_over_http(api: Api) -> None:
    sim = SimFleet(api.engine, api.settings)
    ids = sim.add_devices(6, issued=OLD)
    sim.add_devices(3, site="park", issued=dt.datetime.now(dt.UTC), first=50)  # young keys
    sec = api.headers(Role.security)
    r = api.client.post("/campaigns/preview", json={"select": "key-age>60d"}, headers=sec)
    assert r.status_code == 200, r.text
    assert r.json() == {"selector": "key-age>60d", "devices": 6,
                        "device_ids": ids, "left_out": {}, "needs_confirm": False}
    r = api.client.post("/campaigns/preview", json={"select": "colour=red"}, headers=sec)
    assert r.status_code == 422 and "unknown key 'colour'" in r.text
    r = api.client.post("/campaigns", json={"select": "key-age>60d", "wave": 4,
                                            "max_failures": "20%"}, headers=sec)
    assert r.status_code == 201, r.text
    camp = r.json()
    assert (camp["members"], camp["allowed_failures"], camp["state"], camp["waves"]) == (
        6, 1, "running", 2)
    cid = camp["id"]
    run = CampaignRunner(api.engine, api.settings, command_key.from_settings(api.settings),
                         renew=False)
    run.round(renewal_due=False)
    sim.step()
    got = api.client.get("/campaigns/%d" % cid, headers=sec).json()
    assert got["wave"] == 1 and got["counts"]["active"] == 4 and got["devices"] is None
    got = api.client.get("/campaigns/%d?devices=true" % cid, headers=sec).json()
    assert [(d["device_id"], d["wave"], d["status"], d["rotation_state"])
            for d in got["devices"]] == [(d, 1, "active", "issued") for d in ids[:4]] + [
        (d, None, "waiting", None) for d in ids[4:]]
    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        r = api.client.post("/campaigns/%d/%s" % (cid, action), headers=sec)
        assert r.status_code == 200 and r.json()["state"] == state, r.text
    r = api.client.post("/campaigns/%d/resume" % cid, headers=sec)
    assert r.status_code == 409 and "aborted: it cannot resume" in r.text
    assert api.client.get("/campaigns/999", headers=sec).status_code == 404
    assert [c["id"] for c in api.client.get("/campaigns", headers=sec).json()] == [cid]
    # admins too; nobody else (a technician could otherwise rotate a whole site)
    admin = api.headers(Role.admin)
    assert api.client.get("/campaigns/%d" % cid, headers=admin).status_code == 200
    for role in (Role.technician, Role.viewer, Role.release_manager, Role.vendor):
        r = api.client.post("/campaigns", json={"select": "all", "confirm": True},
                            headers=api.headers(role))
        assert r.status_code == 403
        assert api.client.get("/keys/report", headers=api.headers(role)).status_code == 403
    report = api.client.get("/keys/report", headers=sec).json()
    assert report["summary"]["devices"] == 9
    assert report["summary"]["overdue"] + report["summary"]["rotating"] == 6
    assert {d["device_id"] for d in report["devices"]} == set(ids)  # the young are "ok"
    every = api.client.get("/keys/report?all=true", headers=sec).json()
    assert len(every["devices"]) == 9
    assert report["campaigns"][0]["id"] == cid
    assert audits(api, "campaign.") == [
        ("campaign.preview", "refused", "test-security"),
        ("campaign.create", "ok", "test-security"), ("campaign.wave", "ok", "campaign:1"),
        ("campaign.paused", "ok", "test-security"), ("campaign.running", "ok", "test-security"),
        ("campaign.aborted", "ok", "test-security"),
        ("campaign.resume", "refused", "test-security")]


def test_a_selection_over_the_limit_needs_confirming(api: Api) -> None:
    sim = SimFleet(api.engine, api.settings)
    sim.add_devices(101, issued=OLD)
    sec = api.headers(Role.security)
    r = api.client.post("/campaigns/preview", json={"select": "all"}, headers=sec)
    assert r.json()["needs_confirm"] is True and r.json()["devices"] == 101
    assert len(r.json()["device_ids"]) == 100
    r = api.client.post("/campaigns", json={"select": "all"}, headers=sec)
    assert r.status_code == 409 and "matches 101 devices (over 100)" in r.text
    r = api.client.post("/campaigns", json={"select": "all", "confirm": True}, headers=sec)
    assert r.status_code == 201
    assert [a[:2] for a in audits(api, "campaign.create")] == [
        ("campaign.create", "refused"), ("campaign.create", "ok")]


# ---------------------------------------------------------------------- command line


def _cli(api: Api, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    s = api.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update({"CITYEDGE_MODE": "development", "CITYEDGE_DATABASE_URL": s.database_url,
                "CITYEDGE_CA_DIR": str(s.ca_dir), "CITYEDGE_AUDIT_KEY_FILE": str(s.audit_key_file),
                "CITYEDGE_COMMAND_KEY_FILE": str(s.command_key_file)})
    return cli.run(["keys", *args], env, cwd=cwd)  # in process (support.cli), stdin empty


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_campaign_from_the_command_line(api: Api, tmp_path: Path) -> None:
    sim = SimFleet(api.engine, api.settings)
    ids = sim.add_devices(102, issued=OLD)
    sel = "site=harbour,key-age>60d"
    r = _cli(api, "rotate", "--select", sel, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "selector %s: 102 devices to rotate" % sel in r.stdout
    assert ids[0] in r.stdout and "... and 82 more" in r.stdout
    r = _cli(api, "rotate", "--select", sel, cwd=tmp_path)  # no terminal, no --yes
    assert r.returncode == 1 and "102 devices is over 100" in r.stderr
    assert "--dry-run, then add --yes" in r.stderr and "Traceback" not in r.stderr
    r = _cli(api, "rotate", "--select", "site=harbour,key-age>60", cwd=tmp_path)
    assert r.returncode == 1 and "not a duration" in r.stderr and "Traceback" not in r.stderr
    r = _cli(api, "rotate", "--select", sel, "--wave", "50", "--max-failures", "2%", "--yes",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "campaign 1: 102 devices in waves of 50, halts over 2 failures (2%)" in r.stdout
    CampaignRunner(api.engine, api.settings, command_key.from_settings(api.settings),
                   renew=False).round(renewal_due=False)
    sim.step()
    r = _cli(api, "status", "1", "--json", cwd=tmp_path)
    st = json.loads(r.stdout)
    assert (st["wave"], st["counts"]["active"], st["counts"]["waiting"]) == (1, 50, 52)
    assert st["rotations"] == {"issued": 50}
    r = _cli(api, "status", "1", "--devices", cwd=tmp_path)  # not a terminal: plain text
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()
            if line.startswith("urn:")}
    assert rows[ids[0]] == ["1", "active", "1", "issued"]
    assert rows[ids[-1]] == ["-", "waiting", "0", "-"]
    assert "campaign 1 (%s): running" % sel in r.stdout
    assert "wave 1 of 3 (50 devices each); 102 devices" in r.stdout
    assert "done 0, failed 0 (halts over 2), rotating 50" in r.stdout
    assert _cli(api, "pause", "1", cwd=tmp_path).stdout.strip() == "campaign 1: paused"
    assert _cli(api, "abort", "1", cwd=tmp_path).stdout.strip() == "campaign 1: aborted"
    r = _cli(api, "resume", "1", cwd=tmp_path)
    assert r.returncode == 1 and "aborted: it cannot resume" in r.stderr
    r = _cli(api, "status", "7", cwd=tmp_path)
    assert r.returncode == 1 and "no campaign 7" in r.stderr
    r = _cli(api, "campaigns", cwd=tmp_path)
    assert "aborted" in r.stdout and sel in r.stdout
    r = _cli(api, "report", "--json", cwd=tmp_path)
    got = json.loads(r.stdout)
    assert got["summary"]["devices"] == 102
    assert got["summary"]["rotating"] == 50 and got["summary"]["overdue"] == 52
    r = _cli(api, "report", cwd=tmp_path)
    assert "102 active devices; overdue 52, expired 0" in r.stdout
    assert audits(api, "campaign.")[0] == ("campaign.create", "ok", "cli")
    assert ("campaign.resume", "refused", "cli") in audits(api, "campaign.")


def _cli_in_a_terminal(api: Api, *args: str, cwd: Path, typed: bytes = b""
                       ) -> tuple[int, str]:
    """Run ``cityedge keys ...`` with a pseudo-terminal as stdin, stdout and stderr."""
    s = api.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update({"CITYEDGE_MODE": "development", "CITYEDGE_DATABASE_URL": s.database_url,
                "CITYEDGE_CA_DIR": str(s.ca_dir), "CITYEDGE_AUDIT_KEY_FILE": str(s.audit_key_file),
                "CITYEDGE_COMMAND_KEY_FILE": str(s.command_key_file), "TERM": "xterm",
                "COLUMNS": "120"})
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "keys", *args], env=env,
                            cwd=cwd, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    if typed:
        os.write(master, typed)
    out = b""
    while True:
        ready, _, _ = io_select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(60), out.decode("utf-8", "replace")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_in_a_terminal_it_asks_and_draws_a_progress_bar(api: Api, tmp_path: Path) -> None:
    sim = SimFleet(api.engine, api.settings)
    sim.add_devices(101, issued=OLD)
    code, out = _cli_in_a_terminal(api, "rotate", "--select", "all", cwd=tmp_path,
                                   typed=b"n\n")
    assert code == 1 and "rotate the keys of 101 devices? [y/N]" in out
    assert "not confirmed: nothing started" in out
    code, out = _cli_in_a_terminal(api, "rotate", "--select", "all", "--wave", "60",
                                   cwd=tmp_path, typed=b"y\n")
    assert code == 0 and "campaign 1: 101 devices in waves of 60" in out, out
    CampaignRunner(api.engine, api.settings, command_key.from_settings(api.settings),
                   renew=False).round(renewal_due=False)
    for _ in range(3):
        sim.step()
    code, out = _cli_in_a_terminal(api, "status", "1", cwd=tmp_path)
    assert code == 0
    assert "campaign 1" in out and "60/101" in out and "━" in out  # rich's bar
    assert "done 60, failed 0" in out
