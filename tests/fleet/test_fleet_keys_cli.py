"""``cityedge keys``: the command key is made once (0600, never printed, never replaced) and
required in production; commands are queued, listed and cancelled from the command line,
audited, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet import command_key
from cityedge_fleet.models import AuditRecord
from cityedge_host.crypto import public_sec1

from support import cli
from support.fleet import Api, enroll_device


def _cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``cityedge ARGS`` in process (``support.cli``), in ``cwd``, configured only by
    ``env`` (no ``CITYEDGE_*`` of the test's own environment)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    return cli.run(args, {**base, **env}, cwd=cwd)


def _env(api: Api, **more: str) -> dict[str, str]:
    s = api.settings
    return {"CITYEDGE_MODE": "development", "CITYEDGE_DATABASE_URL": s.database_url,
            "CITYEDGE_CA_DIR": str(s.ca_dir), "CITYEDGE_AUDIT_KEY_FILE": str(s.audit_key_file),
            "CITYEDGE_COMMAND_KEY_FILE": str(s.command_key_file), **more}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_command_key_is_made_once_private_and_never_printed(api: Api,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "keys" / "command.key"
    env = _env(api, CITYEDGE_COMMAND_KEY_FILE=str(path))
    r = _cli(env, "keys", "init-command-key", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signer = command_key.load(path)
    assert signer.kid.hex() in r.stdout
    assert public_sec1(signer.public_key).hex() in r.stdout
    secret = signer.private_pem().decode()
    assert "PRIVATE" not in r.stdout + r.stderr and secret not in r.stdout + r.stderr
    before = path.read_bytes()
    again = _cli(env, "keys", "init-command-key", cwd=tmp_path)
    assert again.returncode == 1 and "exists: it is kept" in again.stderr
    assert path.read_bytes() == before and "Traceback" not in again.stderr
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(
            AuditRecord.action == "command_key.create")).all()
    assert [r.target for r in rows] == [signer.kid.hex()]
    # a key another user may read is refused, as is a missing one in production
    path.chmod(0o640)
    r = _cli(env, "keys", "command", "urn:dev:mac:0024befffe800001", "status", cwd=tmp_path)
    assert r.returncode == 1 and "open to other users (mode 640)" in r.stderr
    prod = {**env, "CITYEDGE_MODE": "production", "CITYEDGE_BROKER_URL": "mqtts://b:8883",
            "CITYEDGE_AUDIT_ANCHOR_FILE": str(tmp_path / "anchor"),
            "CITYEDGE_INGEST_SHARE_GROUP": "ingest-7f3a9c21",
            "CITYEDGE_BROKER_CONTROL_CERT_FILE": "/srv/c.crt",
            "CITYEDGE_BROKER_CONTROL_KEY_FILE": "/srv/c.key",
            "CITYEDGE_COMMANDS_CERT_FILE": "/srv/m.crt", "CITYEDGE_COMMANDS_KEY_FILE": "/srv/m.key",
            "CITYEDGE_COMMAND_KEY_FILE": str(tmp_path / "absent.key")}
    r = _cli(prod, "keys", "command", "urn:dev:mac:0024befffe800001", "status", cwd=tmp_path)
    assert r.returncode == 1 and "does not exist: create it once with `cityedge keys " \
        "init-command-key`" in r.stderr
    assert not (tmp_path / "absent.key").exists()  # production never makes one itself
    del prod["CITYEDGE_COMMAND_KEY_FILE"]
    r = _cli(prod, "keys", "commands", "urn:dev:mac:0024befffe800001", cwd=tmp_path)
    assert r.returncode == 1 and "CITYEDGE_COMMAND_KEY_FILE must be set explicitly" in r.stderr


def test_commands_are_queued_listed_and_cancelled_from_the_command_line(
        api: Api, tmp_path: Path) -> None:
    dev = enroll_device(api, 1)
    env = _env(api)
    r = _cli(env, "keys", "command", dev.id, "status", "--args", '{"a": [1, 2]}',
             "--expires-in", "120", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "command 1 queued: status #1 for %s" % dev.id in r.stdout
    r = _cli(env, "keys", "command", dev.id, "desired", cwd=tmp_path)
    assert r.returncode == 0 and "#2" in r.stdout
    listed = _cli(env, "keys", "commands", dev.id, "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(c["seq"], c["name"], c["state"], c["args"]) for c in rows] == [
        (2, "desired", "queued", None), (1, "status", "queued", {"a": [1, 2]})]
    assert rows[1]["created_by"] == "cli"
    table = _cli(env, "keys", "commands", dev.id, cwd=tmp_path)
    assert table.returncode == 0 and "desired" in table.stdout and "queued" in table.stdout
    for args, why in ((("command", dev.id, "status", "--args", "{nope"), "--args is not JSON"),
                      (("command", dev.id, "Bad Name"), "name:"),
                      (("command", "urn:dev:mac:0024beffff0000ff", "status"), "no device"),
                      (("commands", "urn:dev:mac:0024beffff0000ff"), "no device"),
                      (("cancel", "9999"), "no command 9999")):
        r = _cli(env, "keys", *args, cwd=tmp_path)
        assert r.returncode == 1 and why in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = _cli(env, "keys", "cancel", str(rows[0]["id"]), cwd=tmp_path)
    assert r.returncode == 0 and "cancelled (was queued)" in r.stdout
    r = _cli(env, "keys", "cancel", str(rows[0]["id"]), cwd=tmp_path)
    assert r.returncode == 1 and "cannot become cancelled" in r.stderr
    with Session(api.engine) as s:
        audit_rows = s.exec(select(AuditRecord).where(
            col(AuditRecord.action).in_(["command.create", "command.cancel"]))
            .order_by(col(AuditRecord.id))).all()
    assert [(a.action, a.outcome, a.actor) for a in audit_rows] == [
        ("command.create", "ok", "cli"), ("command.create", "ok", "cli"),
        ("command.create", "refused", "cli"), ("command.create", "refused", "cli"),
        ("command.cancel", "ok", "cli")]


def test_only_a_private_p256_key_is_a_command_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p384 = tmp_path / "p384.key"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    p384.chmod(0o600)
    with pytest.raises(command_key.CommandKeyError, match="not a P-256 key"):
        command_key.load(p384)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(command_key.CommandKeyError, match="not an unencrypted PEM"):
        command_key.load(junk)
    # two services starting together in development end up with one key
    made = tmp_path / "dev" / "command.key"
    a = command_key.load(made, create_missing=True)
    b = command_key.load(made, create_missing=True)
    assert a.kid == b.kid and stat.S_IMODE(made.stat().st_mode) == 0o600
    assert repr(a) == "<EcSigner kid=%s>" % a.kid.hex()  # a log line shows the kid only
