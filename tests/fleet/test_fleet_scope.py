"""Technician tokens scoped to sites: a scoped technician registers devices only at its
sites, changes only devices there and cannot move them away, and gets enrollment tokens
only for serials registered there; every refusal is 403 and audited with the scope. An
unscoped token (every token made before scopes existed) keeps today's rights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlmodel import Session, col, select

from cityedge_fleet.config import Settings
from cityedge_fleet.db import MIGRATIONS_DIR, make_engine, migrate
from cityedge_fleet.models import ApiToken, AuditRecord, Role

from support.cli import run as run_cli
from support.fleet import Api, device_body

SITES = ["docks", "harbour"]


def _scoped(api: Api, sites: list[str] = SITES) -> dict[str, str]:
    r = api.client.post("/tokens", json={"name": "tech-harbour", "role": "technician",
                                         "sites": sites}, headers=api.headers(Role.admin))
    assert r.status_code == 201, r.text
    assert r.json()["sites"] == sorted(sites)
    return {"Authorization": "Bearer " + r.json()["token"]}


def _audit(api: Api, action: str) -> list[AuditRecord]:
    with Session(api.engine) as s:
        return list(s.exec(select(AuditRecord).where(AuditRecord.action == action)
                           .order_by(col(AuditRecord.id))))


def _register(api: Api, i: int, site: str, headers: dict[str, str]) -> int:
    return api.client.post("/devices", json=device_body(i, site=site),
                           headers=headers).status_code


def test_a_scoped_technician_registers_only_at_its_sites(api: Api) -> None:
    tech = _scoped(api)
    assert _register(api, 1, "park", tech) == 403
    assert _register(api, 2, "", tech) == 403  # no site is not one of its sites
    assert _register(api, 3, "harbour", tech) == 201
    assert api.client.get("/devices/%s" % device_body(1)["id"],
                          headers=tech).status_code == 404  # nothing was registered
    refused, done = _audit(api, "device.register")[:2], _audit(api, "device.register")[-1]
    assert [r.outcome for r in refused] == ["denied", "denied"]
    assert json.loads(refused[0].detail) == {"scope": SITES, "sites": ["park"]}
    assert done.outcome == "ok" and json.loads(done.detail)["scope"] == SITES


def test_a_scoped_technician_changes_only_its_devices_and_keeps_them_there(api: Api) -> None:
    unscoped = api.headers(Role.technician)
    tech = _scoped(api)
    assert _register(api, 1, "park", unscoped) == 201
    assert _register(api, 2, "harbour", unscoped) == 201
    park, harbour = device_body(1)["id"], device_body(2)["id"]
    r = api.client.patch("/devices/%s" % park, json={"model": "x"}, headers=tech)
    assert r.status_code == 403
    r = api.client.patch("/devices/%s" % harbour, json={"site": "park"}, headers=tech)
    assert r.status_code == 403
    got = api.client.get("/devices/%s" % harbour, headers=tech).json()
    assert got["site"] == "harbour"  # the refused move changed nothing
    r = api.client.patch("/devices/%s" % harbour, json={"site": "docks", "tags": ["x"]},
                         headers=tech)
    assert r.status_code == 200 and r.json()["site"] == "docks"
    rows = _audit(api, "device.update")
    assert [(r.outcome, r.target) for r in rows] == [("denied", park), ("denied", harbour),
                                                     ("ok", harbour)]
    assert json.loads(rows[1].detail) == {"scope": SITES, "sites": ["park"]}
    assert json.loads(rows[2].detail) == {"site": "docks", "tags": ["x"], "scope": SITES}
    # the unscoped technician still moves devices anywhere
    r = api.client.patch("/devices/%s" % park, json={"site": "old town"}, headers=unscoped)
    assert r.status_code == 200


def test_a_scoped_technician_gets_enrollment_tokens_only_for_its_serials(api: Api) -> None:
    unscoped = api.headers(Role.technician)
    tech = _scoped(api)
    assert _register(api, 1, "park", unscoped) == 201
    assert _register(api, 2, "harbour", unscoped) == 201

    def issue(serial: str, headers: dict[str, str]) -> tuple[int, str]:
        r = api.client.post("/enrollment/tokens", json={"serial": serial}, headers=headers)
        return r.status_code, r.text

    park_code, park_text = issue(str(device_body(1)["serial"]), tech)
    none_code, none_text = issue("SN-NEVER-REGISTERED", tech)
    assert (park_code, none_code) == (403, 403)
    # the same answer whether the serial is elsewhere or nowhere
    assert park_text.replace(str(device_body(1)["serial"]), "S") == none_text.replace(
        "SN-NEVER-REGISTERED", "S")
    assert issue(str(device_body(2)["serial"]), tech)[0] == 201
    assert issue("SN-NEVER-REGISTERED", unscoped)[0] == 201  # unscoped: as before
    rows = _audit(api, "enroll.token")
    assert [r.outcome for r in rows] == ["denied", "denied", "ok", "ok"]
    assert json.loads(rows[1].detail) == {"scope": SITES, "sites": [None]}
    assert json.loads(rows[2].detail)["scope"] == SITES
    assert "scope" not in json.loads(rows[3].detail)


def test_only_technician_tokens_take_sites(api: Api) -> None:
    admin = api.headers(Role.admin)
    for role in ("admin", "security", "viewer"):
        r = api.client.post("/tokens", json={"name": "x", "role": role, "sites": ["harbour"]},
                            headers=admin)
        assert r.status_code == 422, (role, r.text)
        assert "technician tokens only" in r.json()["detail"][0]["msg"]
    listed = api.client.get("/tokens", headers=admin).json()
    assert all(t["sites"] == [] for t in listed)


def test_cli_creates_a_scoped_token(api: Api, tmp_path: Path) -> None:
    env = dict(os.environ, CITYEDGE_MODE="development",
               CITYEDGE_DATABASE_URL=api.settings.database_url,
               CITYEDGE_CA_DIR=str(api.settings.ca_dir))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["fleet", "create-token", *args], env, cwd=tmp_path)  # in process

    made = cli("--name", "alice", "--role", "technician", "--site", "harbour", "--site",
               "docks")
    assert made.returncode == 0, made.stderr
    assert "technician at sites docks, harbour" in made.stderr
    tech = {"Authorization": "Bearer " + made.stdout.strip()}
    assert _register(api, 1, "park", tech) == 403
    assert _register(api, 2, "docks", tech) == 201
    refused = cli("--name", "bob", "--role", "admin", "--site", "harbour")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("cityedge: create-token: sites scope technician tokens")


def test_tokens_made_before_scopes_stay_unscoped(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url, ca_dir=tmp_path),
                         create=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO api_token (name, role, token_hash, created_by, created_at, revoked) "
            "VALUES ('old', 'technician', :h, 'cli', CURRENT_TIMESTAMP, false)"),
            {"h": "0" * 64})
    migrate(engine, create=True)
    with Session(engine) as s:
        row = s.exec(select(ApiToken)).one()
    assert row.sites == []
    engine.dispose()
