"""Rotating the fleet's command key on the fleet's side (``command_key_rotation``, the API
and the CLI), on SQLite and PostgreSQL: what the fleet refuses to roll out (a statement
the root did not sign, an older version, one that leaves out the next key or drops the
current one at once, an expired one, a second rotation), the threshold of the switch,
resend, the root's version counter, and the audit of each step. The devices' answers are
recorded as the ingest records them (``command_queue.record_result``); the answers of a
real gateway are ``tests/gateway/test_gateway_command_key_e2e.py``'s."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_core import command, trust_statement
from cityedge_core.command_decode import Result
from cityedge_fleet import command_key, command_queue
from cityedge_fleet import command_key_rotation as ckr
from cityedge_fleet.ca import ROOT_KEY
from cityedge_fleet.models import AuditRecord, FleetCommand, Role
from cityedge_host.crypto import EcSigner, load_signer, public_sec1

from support import cli
from support.fleet import Api, csr_for, device_body, enroll_device


def _now() -> dt.datetime:
    """Now, read when a test runs (a module constant would be collection time: a long
    suite's later tests would sign statements already expired)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
def root_dir(ca_dirs: tuple[Path, Path], tmp_path: Path) -> Path:
    d = tmp_path / "offline"
    shutil.copytree(ca_dirs[0], d)  # the root's version counter is this test's own
    return d


def _keys(api: Api) -> tuple[EcSigner, EcSigner]:
    cur = command_key.load(api.settings.command_key_file)
    return cur, ckr.keygen(api.settings.command_key_file)


def _announce(root_dir: Path, cur: EcSigner, nxt: EcSigner, keep_s: int | None = 3600
              ) -> bytes:
    return ckr.announce(root_dir, public_sec1(nxt.public_key),
                        old_point=None if keep_s is None else public_sec1(cur.public_key),
                        keep_old_until=None if keep_s is None else
                        _now() + dt.timedelta(seconds=keep_s)).statement


def _start(api: Api, data: bytes, role: Role = Role.security, threshold: int = 100
           ) -> Any:
    return api.client.post("/command-key/rotations", headers=api.headers(role), json={
        "statement": base64.b64encode(data).decode(), "threshold_pct": threshold})


def _answer(api: Api, device: str, outcome: str = command.OK) -> None:
    """The device's verified answer to its trust-update, recorded as the ingest does."""
    with Session(api.engine) as s:
        cmd = s.exec(select(FleetCommand).where(
            col(FleetCommand.device_id) == device,
            col(FleetCommand.name) == trust_statement.TRUST_UPDATE)
            .order_by(col(FleetCommand.id).desc())).first()
        assert cmd is not None
        command_queue.record_result(s, cmd, Result(cmd.name, device, cmd.seq, outcome,
                                                   "installed"), b"signed")
        s.commit()


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_a_rotation_rolls_out_to_every_device_and_switches_at_the_threshold(
        api: Api, root_dir: Path) -> None:
    devices = [enroll_device(api, i).id for i in (1, 2, 3, 4)]
    cur, nxt = _keys(api)
    data = _announce(root_dir, cur, nxt)
    r = _start(api, data, threshold=75)
    assert r.status_code == 201, r.text
    p = r.json()
    assert (p["devices"], p["pending"], p["installed"]) == (4, 4, 0)
    assert (p["old_kid"], p["new_kid"], p["state"]) == (cur.kid.hex(), nxt.kid.hex(),
                                                        "rolling-out")
    with Session(api.engine) as s:
        cmds = s.exec(select(FleetCommand).where(
            col(FleetCommand.name) == trust_statement.TRUST_UPDATE)).all()
        # each signed by the current key, carrying the root's statement as it was signed
        assert sorted(c.device_id for c in cmds) == sorted(devices)
        for c in cmds:
            assert c.kid == cur.kid.hex()
            assert command.cbor.loads(
                command.cose.split_sign1(c.signed, 4096)[2])[command.C_ARGS] == {1: data}
    for d in devices[:2]:
        _answer(api, d)
    _answer(api, devices[2], command.REFUSED)
    key_file = api.settings.command_key_file
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None
        pub = ckr.to_public(s, rot)
        assert (pub.installed, pub.refused, pub.pending) == (2, 1, 1)
        with pytest.raises(ckr.CommandKeyRotationError, match="75%"):
            ckr.switch(s, rot, key_file, force=False)  # 2 of 4 < 75 %
        assert command_key.load(key_file).kid == cur.kid  # nothing moved
    _answer(api, devices[3])
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None
        ckr.switch(s, rot, key_file, force=False)  # 3 of 4
        s.commit()
    assert command_key.load(key_file).kid == nxt.kid
    assert command_key.load(ckr.retired_key_path(key_file)).kid == cur.kid
    assert not ckr.next_key_path(key_file).exists()
    # the device that refused gets it again, signed by the old key (what it trusts)
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None and rot.state == ckr.SWITCHED
        with pytest.raises(ckr.CommandKeyRotationError, match="old key"):
            ckr.resend(s, rot, nxt, by="test", lim=api.settings.limits)
        again = ckr.resend(s, rot, load_signer(ckr.retired_key_path(key_file)), by="test",
                           lim=api.settings.limits)
        s.commit()
    assert again.queued == [devices[2]]


def _enroll_claiming(api: Api, i: int, claim: dict[str, Any]) -> str:
    """Enroll device ``i`` with ``claim`` added to its request body (what a device might
    say about the statement it holds); returns its id."""
    body = device_body(i)
    tech = api.headers(Role.technician)
    assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                            headers=tech).json()["token"]
    r = api.client.post("/enroll", json={
        "serial": body["serial"], "token": token,
        "csr_pem": csr_for(EcSigner.generate(), str(body["id"])), **claim})
    assert r.status_code == 200, r.text
    return str(body["id"])


def _enroll_audit(api: Api, device: str) -> dict[str, Any]:
    with Session(api.engine) as s:
        row = s.exec(select(AuditRecord).where(col(AuditRecord.action) == "enroll",
                                               col(AuditRecord.target) == device)).one()
    detail: dict[str, Any] = json.loads(row.detail)
    return detail


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_a_device_enrolled_with_the_statement_counts_towards_the_switch(
        api: Api, root_dir: Path, tmp_path: Path) -> None:
    """A device enrolled while a rotation rolls out installs the statement from its
    enrollment answer and is sent no trust-update: the fleet counts it as installed from
    its own record of what it handed out (``Device.trust_version``, audited with the
    enrollment and the switch), so the switch needs no --force. A device enrolled with an
    older statement, and one that claims a version in its request, are not counted."""
    answering = enroll_device(api, 1).id
    cur, nxt = _keys(api)
    assert _start(api, _announce(root_dir, cur, nxt)).status_code == 201
    _answer(api, answering)
    late = enroll_device(api, 2)  # handed v1 with its certificate; no trust-update queued
    assert late.enrollment["trust_statement"] is not None
    assert _enroll_audit(api, late.id)["trust_version"] == 1
    assert _enroll_audit(api, answering)["trust_version"] is None  # before the rotation
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None
        p = ckr.to_public(s, rot)
        assert (p.devices, p.installed, p.enrolled, p.pending) == (1, 1, 1, 0)
    sw = _cli(api, tmp_path, "keys", "rotate-command-key", "--switch")  # 2 of 2, no --force
    assert sw.returncode == 0, sw.stderr
    assert "enrolled with the statement (counted as installed): 1 devices" in sw.stdout
    assert command_key.load(api.settings.command_key_file).kid == nxt.kid
    with Session(api.engine) as s:
        row = s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "command_key.switch")).one()
    assert row.outcome == "ok"
    detail = json.loads(row.detail)
    assert {k: detail[k] for k in ("forced", "installed", "enrolled", "enrolled_count")} == {
        "forced": False, "installed": 1, "enrolled": [late.id], "enrolled_count": 1}
    # the next rotation (v2): the device enrolled with v1 is sent v2 and stays silent; one
    # enrolled now is handed v2, and so is one that claims another version in its request
    # (the claim is not read: what counts is what the fleet handed out)
    cur2, nxt2 = nxt, ckr.keygen(api.settings.command_key_file)
    assert _start(api, _announce(root_dir, cur2, nxt2)).status_code == 201
    _answer(api, answering)
    handed = enroll_device(api, 3)
    claimed = _enroll_claiming(api, 4, {"trust_version": 99, "trust_statement": "djk5"})
    assert _enroll_audit(api, handed.id)["trust_version"] == 2
    assert _enroll_audit(api, claimed)["trust_version"] == 2
    key_file = api.settings.command_key_file
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None and rot.version == 2
        p = ckr.to_public(s, rot)
        assert (p.installed, p.enrolled, p.pending) == (1, 2, 1)  # late: pending, silent
        with pytest.raises(ckr.CommandKeyRotationError, match=r"3 devices installed the "
                           r"statement \(2 of them enrolled with it\), 100%"):
            ckr.switch(s, rot, key_file, force=False)  # 3 of 4: late (v1) blocks it
    assert command_key.load(key_file).kid == nxt.kid  # nothing moved
    _answer(api, late.id)
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None
        counted = ckr.switch(s, rot, key_file, force=False)  # 4 of 4
        s.commit()
    assert counted.answered == {answering, late.id}
    assert counted.enrolled == {handed.id, claimed}
    assert command_key.load(key_file).kid == nxt2.kid


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_fleet_refuses_what_it_must_not_roll_out(api: Api, root_dir: Path,
                                                     tmp_path: Path) -> None:
    enroll_device(api, 1)
    cur, nxt = _keys(api)
    # a statement the fleet's own (stolen) command key signed: not the root's
    forged = trust_statement.encode_statement(
        cur, cur.kid, 99, [(public_sec1(nxt.public_key), None)],
        int(_now().timestamp()) - 60, int(_now().timestamp()) + 3600)
    r = _start(api, forged)
    assert r.status_code == 422 and "not by the root" in str(r.json()["detail"])
    # garbage, and not base64
    assert _start(api, b"\xd2\x84garbage").status_code == 422
    bad = api.client.post("/command-key/rotations", headers=api.headers(Role.security),
                          json={"statement": "!!!"})
    assert bad.status_code == 422 and "statement" in str(bad.json()["detail"])
    bad = api.client.post("/command-key/rotations", headers=api.headers(Role.security),
                          json={"statement": "QUJ"})  # the pattern's, not base64
    assert bad.status_code == 422 and "base64" in str(bad.json()["detail"])
    # the current key dropped at once: the fleet could not command a device that installed it
    r = _start(api, _announce(root_dir, cur, nxt, keep_s=None))
    assert r.status_code == 422 and "--keep-old-until" in str(r.json()["detail"])
    # it does not list this fleet's next key
    other = EcSigner.generate()
    r = _start(api, _announce(root_dir, cur, other))
    assert r.status_code == 422 and nxt.kid.hex() in str(r.json()["detail"])
    # the roles: a technician or a viewer may not
    good = _announce(root_dir, cur, nxt)
    assert _start(api, good, role=Role.technician).status_code == 403
    assert _start(api, good, role=Role.viewer).status_code == 403
    assert _start(api, good).status_code == 201
    # a second one while it rolls out; then an older version (a replay)
    r = _start(api, _announce(root_dir, cur, nxt))
    assert r.status_code == 409 and "rolling out" in str(r.json()["detail"])
    assert _start(api, good).status_code == 409
    with Session(api.engine) as s:
        refusals = s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "command_key.rotate",
            col(AuditRecord.outcome) == "refused")).all()
        oks = s.exec(select(AuditRecord).where(
            col(AuditRecord.action) == "command_key.rotate",
            col(AuditRecord.outcome) == "ok")).all()
    whys = [json.loads(r.detail)["why"] for r in refusals]
    assert len(oks) == 1 and len(whys) == 8, whys
    # the generic command route may not send a trust-update
    r = api.client.post("/devices/%s/commands" % "urn:dev:mac:0024befffe800001",
                        headers=api.headers(Role.security),
                        json={"name": "trust-update", "args": {"1": "x"}})
    assert r.status_code in (404, 422)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_expired_or_stale_statement_is_refused(api: Api, root_dir: Path) -> None:
    cur, nxt = _keys(api)
    root = load_signer(root_dir / ROOT_KEY)
    t = int(_now().timestamp())
    keys = [(public_sec1(nxt.public_key), None), (public_sec1(cur.public_key), t + 60)]
    expired = trust_statement.encode_statement(root, root.kid, 50, keys, t - 7200, t - 1)
    r = _start(api, expired)
    assert r.status_code == 422 and "expired" in str(r.json()["detail"])
    v2 = trust_statement.encode_statement(root, root.kid, 2, keys, t - 60, t + 3600)
    v1 = trust_statement.encode_statement(root, root.kid, 1, keys, t - 60, t + 3600)
    assert _start(api, v2).status_code == 201
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None
        rot.state = ckr.CommandKeyRotationState.abandoned
        s.add(rot)
        s.commit()
    r = _start(api, v1)
    assert r.status_code == 409 and "rollback" in str(r.json()["detail"])


def _cli(api: Api, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    s = api.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update(CITYEDGE_MODE="development", CITYEDGE_DATABASE_URL=s.database_url,
               CITYEDGE_CA_DIR=str(s.ca_dir), CITYEDGE_AUDIT_KEY_FILE=str(s.audit_key_file),
               CITYEDGE_COMMAND_KEY_FILE=str(s.command_key_file))
    return cli.run(args, env, cwd=tmp_path)  # in process (support.cli)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_announces_rolls_out_and_switches(api: Api, root_dir: Path,
                                                  tmp_path: Path) -> None:
    enroll_device(api, 1)
    cur = command_key.load(api.settings.command_key_file)
    gen = _cli(api, tmp_path, "keys", "command-keygen")
    assert gen.returncode == 0, gen.stderr
    (tmp_path / "next.pub").write_text(gen.stdout.split()[-1] + "\n")
    (tmp_path / "cur.pub").write_text(public_sec1(cur.public_key).hex() + "\n")
    again = _cli(api, tmp_path, "keys", "command-keygen")
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in \
        again.stderr
    with pytest.raises(ckr.CommandKeyRotationError, match="go together"):
        ckr.announce(root_dir, public_sec1(cur.public_key),
                     keep_old_until=_now() + dt.timedelta(days=1))
    first = ckr.announce(root_dir, bytes.fromhex((tmp_path / "next.pub").read_text()))
    ann = _cli(api, tmp_path, "keys", "announce-command-key", "--root-dir", str(root_dir),
               "--new-key-pub", "next.pub", "--old-key-pub", "cur.pub",
               "--keep-old-until", (_now() + dt.timedelta(days=2)).isoformat(),
               "--out", "s.cose")
    assert ann.returncode == 0, ann.stderr
    versions = [first.version, int(ann.stdout.split()[1][1:])]
    root_pem = (root_dir / ROOT_KEY).read_text()
    assert "PRIVATE" not in ann.stdout + ann.stderr and root_pem not in ann.stdout
    assert versions[1] == versions[0] + 1  # the root never signs one version twice
    start = _cli(api, tmp_path, "keys", "rotate-command-key", "--statement", "s.cose")
    assert start.returncode == 0, start.stderr
    assert "queued for 1 devices" in start.stdout and "installed 0" in start.stdout
    sw = _cli(api, tmp_path, "keys", "rotate-command-key", "--switch")
    assert sw.returncode == 1 and "--force" in sw.stderr
    assert command_key.load(api.settings.command_key_file).kid == cur.kid
    served = api.client.get("/ca/fleet-keys").json()["fleet_keys"]
    assert served == command_key.trust_store(cur)
    sw = _cli(api, tmp_path, "keys", "rotate-command-key", "--switch", "--force")
    assert sw.returncode == 0, sw.stderr
    assert "no restart" in sw.stdout
    new = command_key.load(api.settings.command_key_file)
    assert new.kid != cur.kid
    # the running app (made before the switch) hands out and signs with the new key now
    assert api.client.get("/ca/fleet-keys").json()["fleet_keys"] == \
        command_key.trust_store(new)
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None and rot.state == ckr.SWITCHED
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(
            col(AuditRecord.action).startswith("command_key."))
            .order_by(col(AuditRecord.id))).all()
    assert [(r.action, r.outcome) for r in rows] == [
        ("command_key.next", "ok"), ("command_key.rotate", "ok"),
        ("command_key.switch", "refused"), ("command_key.switch", "ok")]
    assert json.loads(rows[-1].detail)["forced"] is True


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_switch_cut_between_its_renames_is_finished_by_the_next(api: Api,
                                                                  root_dir: Path) -> None:
    enroll_device(api, 1)
    cur, nxt = _keys(api)
    assert _start(api, _announce(root_dir, cur, nxt)).status_code == 201
    key_file = api.settings.command_key_file
    os.replace(key_file, ckr.retired_key_path(key_file))  # the first rename, then the cut
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None and rot.state == ckr.ROLLING_OUT
        ckr.switch(s, rot, key_file, force=True)
        s.commit()
    assert command_key.load(key_file).kid == nxt.kid
    assert command_key.load(ckr.retired_key_path(key_file)).kid == cur.kid
    # a second switch is refused: nothing moves again
    with Session(api.engine) as s:
        rot = ckr.current(s)
        assert rot is not None
        with pytest.raises(ckr.CommandKeyRotationError, match="is switched"):
            ckr.switch(s, rot, key_file, force=True)


def test_a_key_file_follows_a_replaced_file_and_never_falls_back(tmp_path: Path) -> None:
    """``KeyFile``: the key in the file now; a replaced file is read again, a missing one is
    an error (not the key it had), an unchanged one is not read again."""
    path = tmp_path / "command.key"
    first = command_key.create(path)
    held = command_key.KeyFile(path)
    assert held.current().kid == first.kid and held.current().kid == first.kid
    assert held.loads == 1
    nxt = tmp_path / "command.key.next"
    second = command_key.create(nxt)
    os.replace(path, tmp_path / "command.key.retired")
    with pytest.raises(command_key.CommandKeyError, match="does not exist"):
        held.current()
    os.replace(nxt, path)
    assert held.current().kid == second.kid and held.loads == 2
    path.chmod(0o644)
    with pytest.raises(command_key.CommandKeyError, match="open to other users"):
        held.current()
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_enrollment_hands_out_the_newest_statement(api: Api, root_dir: Path) -> None:
    """A device enrolled after a command-key rotation is handed the newest statement the
    root signed (not the abandoned one after it): installing it, the device holds that
    version, and the older statement replayed to it is refused as a rollback."""
    first = enroll_device(api, 1)
    assert first.enrollment["trust_statement"] is None  # no rotation yet
    cur, nxt = _keys(api)
    v1 = _announce(root_dir, cur, nxt)
    assert _start(api, v1).status_code == 201
    second = enroll_device(api, 2)
    handed = second.enrollment["trust_statement"]
    assert isinstance(handed, str) and base64.b64decode(handed) == v1
    root = ckr.root_verifier(api.settings.ca_dir)
    now = int(_now().timestamp())
    st = trust_statement.check_statement(base64.b64decode(handed), root, root.kid, 0, now)
    assert public_sec1(nxt.public_key) in st.points_at(now)
    with pytest.raises(trust_statement.StatementRefused, match="rollback"):
        trust_statement.check_statement(v1, root, root.kid, st.version, now)
    # a later statement given up (abandoned) is not handed out
    v2 = _announce(root_dir, cur, EcSigner.generate())
    with Session(api.engine) as s:
        s.add(ckr.CommandKeyRotation(
            version=st.version + 1, statement=v2, statement_sha256="0" * 64,
            old_kid=cur.kid.hex(), new_kid="00" * 8, expires_at=_now() + dt.timedelta(hours=1),
            threshold_pct=100, state=ckr.CommandKeyRotationState.abandoned,
            created_by="test"))
        s.commit()
    third = enroll_device(api, 3)
    assert third.enrollment["trust_statement"] == handed
