"""``cityedge keys rotate-device``, ``keys rotations`` and ``keys revoke`` from the command
line, on SQLite and PostgreSQL: a rotation started and listed, refused with a message (no
traceback) when it cannot start, and an emergency revocation that revokes every
certificate, quarantines the device and says the broker was not told when there is none
to tell; every action audited with actor ``cli``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from sqlmodel import Session, col, select

from cityedge_core import chain
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import AuditRecord, Credential

from support import cli
from support.fleet import Api, enroll_device


def _cli(api: Api, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    s = api.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update({"CITYEDGE_MODE": "development", "CITYEDGE_DATABASE_URL": s.database_url,
                "CITYEDGE_CA_DIR": str(s.ca_dir),
                "CITYEDGE_AUDIT_KEY_FILE": str(s.audit_key_file),
                "CITYEDGE_COMMAND_KEY_FILE": str(s.command_key_file)})
    return cli.run(["keys", *args], env, cwd=cwd)  # in process (support.cli)


def _actions(api: Api) -> list[tuple[str, str, str]]:
    with Session(api.engine) as s:
        return [(r.actor, r.action, r.outcome) for r in s.exec(select(AuditRecord).where(
            col(AuditRecord.action).in_(("rotation.pending", "rotation.sent",
                                          "rotation.start", "device.revoke")))
            .order_by(col(AuditRecord.id)))]


def test_rotate_list_and_revoke_from_the_command_line(api: Api, tmp_path: Path) -> None:
    dev = enroll_device(api, 1)
    r = _cli(api, "rotate-device", dev.id, cwd=tmp_path)  # provisioned, not active yet
    assert r.returncode == 1 and "only an active device" in r.stderr
    assert "Traceback" not in r.stderr
    assert Ingestor(api.engine, api.settings).handle(dev.topic, dev.sign()).status == chain.OK
    r = _cli(api, "rotate-device", dev.id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sent" in r.stdout and dev.signer.kid.hex() in r.stdout
    r = _cli(api, "rotations", dev.id, "--json", cwd=tmp_path)
    rows = json.loads(r.stdout)
    assert [(x["state"], x["old_kid"], x["created_by"]) for x in rows] == [
        ("sent", dev.signer.kid.hex(), "cli")]
    r = _cli(api, "rotate-device", dev.id, cwd=tmp_path)
    assert r.returncode == 1 and "one at a time" in r.stderr
    r = _cli(api, "revoke", dev.id, "--reason", "stolen", cwd=tmp_path)
    assert r.returncode == 1 and "not a revocation reason" in r.stderr
    r = _cli(api, "revoke", dev.id, "--reason", "key-compromise", "--note", "cabinet 17",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "quarantined" in r.stdout and "NOT told" in r.stdout  # no broker configured
    with Session(api.engine) as s:
        assert {c.status for c in s.exec(select(Credential).where(
            col(Credential.device_id) == dev.id))} == {"revoked"}
    r = _cli(api, "rotations", dev.id, cwd=tmp_path)
    assert "failed" in r.stdout and "device revoked (key-compromise)" in r.stdout
    assert _actions(api) == [("cli", "rotation.start", "refused"),
                             ("cli", "rotation.pending", "ok"), ("cli", "rotation.sent", "ok"),
                             ("cli", "rotation.start", "refused"),
                             ("cli", "device.revoke", "ok")]
    r = _cli(api, "revoke", "urn:dev:mac:00000000000000ff", cwd=tmp_path)
    assert r.returncode == 1 and "no device" in r.stderr and "Traceback" not in r.stderr
