"""Fleet commands queued per device, on SQLite and PostgreSQL: numbered, signed in the form
the device's own gate accepts, listed, cancelled, expired, audited; input limits; two
creators at once get distinct increasing sequence numbers; the trust store reaches the
device at enrollment (both enrollment paths)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_core import limits
from cityedge_core.command_gate import CommandRefused
from cityedge_fleet import command_key, command_queue
from cityedge_fleet.command_publisher import CommandPublisher
from cityedge_fleet.models import AuditRecord, FleetCommand, Role
from cityedge_host.crypto import EcSigner

from support.commands import device_gate
from support.fleet import Api, csr_for, device_body, enroll_device
from support.mosquitto import TestPKI


def send(api: Api, device: str, role: Role = Role.security, **body: Any) -> Any:
    body.setdefault("name", "status")
    return api.client.post("/devices/%s/commands" % device, json=body,
                           headers=api.headers(role))


def signed_of(api: Api, command_id: int) -> bytes:
    with Session(api.engine) as s:
        row = s.get(FleetCommand, command_id)
        assert row is not None
        return row.signed


def test_a_command_is_numbered_signed_for_the_device_and_listed(api: Api) -> None:
    dev = enroll_device(api, 1)
    keys = dev.enrollment["fleet_keys"]
    assert isinstance(keys, list) and len(keys) == 1
    r = send(api, dev.id, args={"sample_interval_s": 30}, expires_in_s=600)
    assert r.status_code == 201, r.text
    first = r.json()
    assert (first["seq"], first["state"], first["name"]) == (1, "queued", "status")
    assert first["args"] == {"sample_interval_s": 30} and first["attempts"] == 0
    created = dt.datetime.fromisoformat(first["created_at"])
    assert dt.datetime.fromisoformat(first["expires_at"]) - created == dt.timedelta(
        seconds=600)
    second = send(api, dev.id, role=Role.admin, name="desired").json()
    assert second["seq"] == 2
    # the device's own gate takes exactly these bytes, in order, once each
    gate = device_gate(dev.id, keys)  # type: ignore[arg-type]
    assert gate.check(signed_of(api, first["id"])) == ("status", 1, {"sample_interval_s": 30})
    assert gate.check(signed_of(api, second["id"])) == ("desired", 2, None)
    with pytest.raises(CommandRefused, match="replay"):
        gate.check(signed_of(api, first["id"]))
    # and another device's gate refuses them
    other = enroll_device(api, 2)
    with pytest.raises(CommandRefused, match="not this device"):
        device_gate(other.id, keys).check(signed_of(api, first["id"]))  # type: ignore[arg-type]
    viewer = api.headers(Role.viewer)
    listed = api.client.get("/devices/%s/commands" % dev.id, headers=viewer).json()
    assert [c["seq"] for c in listed] == [2, 1]
    assert api.client.get("/devices/%s/commands" % dev.id, headers=viewer,
                          params={"state": "queued", "limit": 1}).json()[0]["seq"] == 2
    one = api.client.get("/commands/%d" % first["id"], headers=viewer).json()
    assert one == first
    assert api.client.get("/commands/999999", headers=viewer).status_code == 404
    assert api.client.get("/devices/urn:dev:mac:nobody00/commands",
                          headers=viewer).status_code == 404
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "command.create")
                      .order_by(col(AuditRecord.id))).all()
    assert [(r.outcome, r.target) for r in rows] == [("ok", dev.id), ("ok", dev.id)]
    assert '"seq":1' in rows[0].detail and rows[0].actor == "test-security"


def test_only_security_and_admin_send_and_technicians_cannot(api: Api) -> None:
    dev = enroll_device(api, 3)
    for role in (Role.technician, Role.viewer, Role.release_manager, Role.vendor):
        assert send(api, dev.id, role=role).status_code == 403
    assert send(api, dev.id, role=Role.security).status_code == 201
    for role in (Role.technician, Role.viewer, Role.release_manager):
        assert api.client.get("/devices/%s/commands" % dev.id,
                              headers=api.headers(role)).status_code == 200


def test_bad_input_is_refused_with_a_reason_and_audited(api: Api) -> None:
    dev = enroll_device(api, 4)
    lim = api.settings.limits
    cases = [
        ({"name": "Status"}, 422, "a-z"),
        ({"name": "x" * (limits.COMMAND_NAME_MAX_CHARS + 1)}, 422, "at most"),
        ({"name": "status", "args": "a" * limits.COMMAND_ARGS_MAX_BYTES}, 422, "bytes as CBOR"),
        ({"name": "status", "args": {"k": [[[[[[[[[1]]]]]]]]]}}, 422, "nested deeper"),
        ({"name": "status", "args": 2**64}, 422, "within 64 bits"),
        ({"name": "status", "expires_in_s": lim.command_expires_max_s + 1}, 422,
         "expires_in_s"),
        ({"name": "status", "expires_in_s": 0}, 422, "greater than 0"),
    ]
    for body, status, why in cases:
        r = send(api, dev.id, **body)
        assert r.status_code == status, (body, r.text)
        assert why in r.text, (body, r.text)
    r = api.client.post("/devices/%s/commands" % dev.id, content=b'{"name":"x","args":NaN}',
                        headers={**api.headers(Role.security),
                                 "Content-Type": "application/json"})
    assert r.status_code == 422 and "finite" in r.text
    assert send(api, "urn:dev:mac:nobody00").status_code == 404
    tech = api.headers(Role.technician)
    body = device_body(5)
    assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    r = send(api, str(body["id"]))
    assert r.status_code == 409 and "registered" in r.text  # not enrolled: not at the broker
    with Session(api.engine) as s:
        assert s.exec(select(FleetCommand)).first() is None
        refused = s.exec(select(AuditRecord).where(AuditRecord.action == "command.create",
                                                   AuditRecord.outcome == "refused")).all()
    assert len(refused) >= 6


def test_a_device_that_does_not_answer_does_not_pile_up_commands(api: Api) -> None:
    dev = enroll_device(api, 6)
    most = api.settings.limits.command_pending_max
    ids = [send(api, dev.id).json()["id"] for _ in range(most)]
    r = send(api, dev.id)
    assert r.status_code == 409 and "waiting for an answer" in r.text
    assert api.client.post("/commands/%d/cancel" % ids[0],
                           headers=api.headers(Role.security)).status_code == 200
    assert send(api, dev.id).json()["seq"] == most + 1  # numbers are never reused


def test_cancel_stops_a_pending_command_once_and_is_audited(api: Api) -> None:
    dev = enroll_device(api, 7)
    cid = send(api, dev.id).json()["id"]
    sec = api.headers(Role.security)
    assert api.client.post("/commands/%d/cancel" % cid,
                           headers=api.headers(Role.technician)).status_code == 403
    r = api.client.post("/commands/%d/cancel" % cid, headers=sec)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["finished_by"] == "test-security"
    r = api.client.post("/commands/%d/cancel" % cid, headers=sec)
    assert r.status_code == 409 and "cancelled" in r.text
    assert api.client.post("/commands/424242/cancel", headers=sec).status_code == 404
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "command.cancel")
                      .order_by(col(AuditRecord.id))).all()
    assert [r.outcome for r in rows] == ["ok", "refused"]


def test_expired_commands_become_expired_and_are_audited(api: Api, pki: TestPKI) -> None:
    dev = enroll_device(api, 8)
    short = send(api, dev.id, expires_in_s=60).json()
    long = send(api, dev.id, expires_in_s=3600).json()
    creds = pki.service("fleet-commands")
    settings = api.settings.model_copy(update={
        "mqtt_ca_file": pki.ca_pem, "commands_cert_file": creds.cert_pem,
        "commands_key_file": creds.key_pem})
    publisher = CommandPublisher(api.engine, settings)  # never connected: expiry only
    later = dt.datetime.fromisoformat(short["expires_at"])
    done = publisher.round(now=later)
    assert done.expired == [short["id"]] and done.tried == 0
    assert publisher.round(now=later).expired == []  # once
    viewer = api.headers(Role.viewer)
    assert api.client.get("/commands/%d" % short["id"], headers=viewer).json()["state"] == (
        "expired")
    assert api.client.get("/commands/%d" % long["id"], headers=viewer).json()["state"] == (
        "queued")
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "command.expire")).all()
    assert [r.target for r in rows] == [dev.id] and rows[0].actor == "fleet"
    r = api.client.post("/commands/%d/cancel" % short["id"], headers=api.headers(Role.security))
    assert r.status_code == 409


def test_two_creators_at_once_get_distinct_increasing_seqs(api: Api) -> None:
    """Two API replicas (two sessions, started together) queue commands for one device:
    every seq is handed out once, each creator's are increasing, none is lost."""
    dev = enroll_device(api, 9)
    signer = command_key.from_settings(api.settings)
    per_creator = 8
    lim = api.settings.limits.model_copy(update={"command_pending_max": 100})
    start = threading.Barrier(2)
    got: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def create(who: str) -> None:
        try:
            start.wait()
            for _ in range(per_creator):
                with Session(api.engine) as s:
                    cmd = command_queue.queue(s, signer=signer, device_id=dev.id,
                                              name="status", args=None, expires_in_s=None,
                                              created_by=who, lim=lim)
                    s.commit()
                    got[who].append(cmd.seq)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=create, args=(w,)) for w in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(got["a"] + got["b"]) == list(range(1, 2 * per_creator + 1))
    for seqs in got.values():
        assert seqs == sorted(seqs)


def test_the_trust_store_reaches_the_device_on_both_enrollment_paths(
        api: Api, tmp_path: Path) -> None:
    signer = command_key.load(api.settings.command_key_file)
    expected = command_key.trust_store(signer)
    dev = enroll_device(api, 10)
    assert dev.enrollment["fleet_keys"] == expected
    assert api.client.get("/ca/fleet-keys").json() == {"fleet_keys": expected}
    # the offline ticket path: the token registers and enrolls; used again, the same answer
    tech = api.headers(Role.technician)
    token = api.client.post("/enrollment/tokens", json={"serial": "SN-T1"},
                            headers=tech).json()["token"]
    key = EcSigner.generate()
    body = {"serial": "SN-T1", "token": token,
            "csr_pem": csr_for(key, "urn:dev:mac:0024beffff000001"),
            "registration": {"id": "urn:dev:mac:0024beffff000001", "model": "ce-air-1"}}
    first = api.client.post("/enroll/ticket", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["fleet_keys"] == expected
    again = api.client.post("/enroll/ticket", json=body)
    assert again.headers["X-Cityedge-Enrollment"] == "existing"
    assert again.json()["fleet_keys"] == expected
