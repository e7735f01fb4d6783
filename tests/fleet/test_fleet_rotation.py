"""Device key rotation through the real fleet (API, ingest, CA, command queue) on SQLite and
PostgreSQL, the device's side played with the core (``cityedge_core.rotation``) and the
device's own command gate: a rotation runs from ``rotate`` to ``old-revoked`` with the
chain unbroken across the key change; forged, replayed, other-device and keyless CSR
messages are refused and audited without moving the rotation; a quarantined or revoked
device cannot rotate; a device's bad CSR fails its rotation; only the security role
rotates and revokes; emergency revocation revokes everything and the ingest refuses the
device from that moment."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import event
from sqlmodel import Session, col, select

from cityedge_core import cbor, chain, command, rotation
from cityedge_fleet import rotation as fleet_rotation
from cityedge_fleet import rotation_ingest
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.ingest import NOT_ACCEPTING, Ingestor
from cityedge_fleet.models import Credential, IngestEvent, Role
from cityedge_host.crypto import EcSigner

from support.commands import device_gate
from support.fleet import Api, EnrolledDevice, enroll_device
from support.rotation import (
    audit_actions,
    command_args,
    command_row,
    csr_message,
    csr_topic,
    rotation_row,
)


def start(api: Api, dev: EnrolledDevice, role: Role = Role.security) -> Any:
    return api.client.post("/devices/%s/rotate" % dev.id, headers=api.headers(role))


def active_device(api: Api, i: int = 1) -> tuple[EnrolledDevice, Ingestor]:
    dev = enroll_device(api, i)
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(dev.topic, dev.sign()).status == chain.OK  # now active
    return dev, ing


def sent(api: Api, dev: EnrolledDevice) -> int:
    """Start a rotation; the device's gate takes its rotate command: its id."""
    r = start(api, dev)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "sent"
    cmd = command_row(api.engine, r.json()["rotate_command_id"])
    gate = device_gate(dev.id, dev.enrollment["fleet_keys"])  # type: ignore[arg-type]
    name, _seq, args = gate.check(cmd.signed)
    assert name == rotation.ROTATE
    rid = rotation.rotate_args(args)
    assert rid == r.json()["id"]
    return rid


def credentials(api: Api, device: str) -> dict[str, str]:
    with Session(api.engine) as s:
        return {c.kid: c.status for c in s.exec(select(Credential).where(
            col(Credential.device_id) == device))}


def test_a_rotation_runs_to_old_revoked_and_the_chain_goes_on(api: Api) -> None:
    dev, ing = active_device(api)
    old_kid = dev.signer.kid.hex()
    rid = sent(api, dev)
    new = EcSigner.generate()
    out = ing.handle(csr_topic(dev.id), csr_message(dev.signer, dev.id, rid, new))
    assert out.status == rotation_ingest.CSR_TAKEN
    rot = rotation_row(api.engine, rid)
    assert (rot.state, rot.old_kid, rot.new_kid) == ("issued", old_kid, new.kid.hex())
    assert credentials(api, dev.id) == {old_kid: "active", new.kid.hex(): "active"}
    # install-cert: the device's gate takes it; the certificate holds the new key
    install = command_row(api.engine, rot.install_command_id)
    gate = device_gate(dev.id, dev.enrollment["fleet_keys"])  # type: ignore[arg-type]
    gate.state.set(cmd_seq=1)
    name, seq, args = gate.check(install.signed)
    got_rid, der = rotation.install_cert_args(args)
    assert (name, got_rid) == (rotation.INSTALL_CERT, rid)
    cert = x509.load_der_x509_certificate(der)
    assert "%x" % cert.serial_number == rot.new_serial
    from cityedge_host.crypto import public_sec1
    assert rotation.cert_holds_key(der, public_sec1(new.public_key))
    ok = command.encode_result(dev.signer, dev.signer.kid, name, dev.id, seq, "ok")
    assert ing.handle("ce/v1/%s/up/result" % dev.id, ok).status == "result"
    assert rotation_row(api.engine, rid).state == "issued"  # waits for a batch under B
    # the old key signs one more; then the device switches: its next batch links to it
    assert ing.handle(dev.topic, dev.sign()).status == chain.OK
    dev.writer.signer, dev.writer.kid = new, new.kid
    out = ing.handle(dev.topic, dev.sign())
    assert out.status == chain.OK  # not a gap, not a fork: the chain is unbroken
    rot = rotation_row(api.engine, rid)
    assert (rot.state, rot.proven_seq) == ("proven", 3)
    assert credentials(api, dev.id) == {old_kid: "revoked", new.kid.hex(): "active"}
    old_serial = next(c["serial"] for c in api.client.get(
        "/devices/%s/credentials" % dev.id, headers=api.headers(Role.viewer)).json()
        if c["kid"] == old_kid)
    assert CertificateAuthority(api.settings.ca_dir).crl_serials() == {int(old_serial, 16)}
    erase = command_row(api.engine, rot.erase_command_id)
    assert command_args(erase) == {rotation.A_ROTATION: rid,
                                   rotation.A_OLD_KID: dev.signer.kid}
    name, seq, args = gate.check(erase.signed)
    assert rotation.erase_key_args(args) == (rid, dev.signer.kid)
    done = command.encode_result(new, new.kid, name, dev.id, seq, "ok")
    assert ing.handle("ce/v1/%s/up/result" % dev.id, done).status == "result"
    assert rotation_row(api.engine, rid).state == "old-revoked"
    # the old key's batches are refused from now on (the ingest's key cache aside: the
    # credential is revoked, and a fresh ingest does not know the key)
    dev.writer.signer, dev.writer.kid = dev.signer, dev.signer.kid
    assert Ingestor(api.engine, api.settings).handle(dev.topic, dev.sign()).status == (
        chain.UNKNOWN_KEY)
    assert audit_actions(api.engine, "rotation.") == [
        ("rotation.pending", "ok"), ("rotation.sent", "ok"), ("rotation.csr-received", "ok"),
        ("rotation.issued", "ok"), ("rotation.proven", "ok"),
        ("rotation.old-revoked", "ok")]
    listed = api.client.get("/devices/%s/rotations" % dev.id,
                            headers=api.headers(Role.viewer)).json()
    assert [r["state"] for r in listed] == ["old-revoked"]


def test_forged_replayed_foreign_and_keyless_csr_messages_are_refused_and_audited(
        api: Api) -> None:
    dev, ing = active_device(api, 1)
    other, _ = active_device(api, 2)
    rid = sent(api, dev)
    new = EcSigner.generate()
    good = csr_message(dev.signer, dev.id, rid, new)
    stranger = EcSigner.generate()
    proof_only = cbor.loads(good)
    cases = [
        # the proof signed by a key that is not the device's (the new key, a stranger's)
        (csr_message(new, dev.id, rid, new), rotation_ingest.CSR_BAD_PROOF),
        (rotation.csr_message(stranger, dev.signer.kid, dev.id, rid,
                              cbor.loads(good)[1]), rotation_ingest.CSR_BAD_PROOF),
        # proof missing; not CBOR at all
        (cbor.dumps({rotation.M_CSR: proof_only[1]}), rotation_ingest.CSR_MALFORMED),
        (b"\xff" * 40, rotation_ingest.CSR_MALFORMED),
        # another device's message (its key, its id) published on this device's topic
        (csr_message(other.signer, other.id, rid, new), rotation_ingest.CSR_WRONG_DEVICE),
        # this device's proof naming another device's rotation id
        (csr_message(dev.signer, dev.id, rid + 1, new), rotation_ingest.CSR_NO_ROTATION),
        # the other device's key proving this device's message
        (rotation.csr_message(other.signer, other.signer.kid, dev.id, rid,
                              cbor.loads(good)[1]), rotation_ingest.CSR_BAD_PROOF),
    ]
    for data, status in cases:
        assert ing.handle(csr_topic(dev.id), data).status == status
        assert rotation_row(api.engine, rid).state == "sent"  # nobody vouched: no move
    refused = [a for a in audit_actions(api.engine, "rotation.csr")]
    assert refused == [("rotation.csr", "refused")] * len(cases)
    assert ing.handle(csr_topic(dev.id), good).status == rotation_ingest.CSR_TAKEN
    # the same message again (a replay) finds no rotation waiting for it
    assert ing.handle(csr_topic(dev.id), good).status == rotation_ingest.CSR_NO_ROTATION
    assert rotation_row(api.engine, rid).state == "issued"
    with Session(api.engine) as s:
        statuses = [e.status for e in s.exec(select(IngestEvent).where(
            col(IngestEvent.device_id) == dev.id))]
    assert statuses.count(rotation_ingest.CSR_BAD_PROOF) == 3


def test_a_bad_csr_the_device_vouched_for_fails_its_rotation(api: Api) -> None:
    dev, ing = active_device(api, 1)
    other, _ = active_device(api, 2)
    rid = sent(api, dev)
    bad = csr_message(dev.signer, dev.id, rid, EcSigner.generate(), cn=other.id)
    assert ing.handle(csr_topic(dev.id), bad).status == rotation_ingest.CSR_BAD_CSR
    rot = rotation_row(api.engine, rid)
    assert rot.state == "failed" and "CN" in rot.reason
    # a new rotation may start; the device's current key as the "new" one is refused
    rid2 = sent(api, dev)
    same = csr_message(dev.signer, dev.id, rid2, dev.signer)
    assert ing.handle(csr_topic(dev.id), same).status == rotation_ingest.CSR_KEY_KNOWN
    assert rotation_row(api.engine, rid2).state == "failed"


def test_a_quarantined_or_revoked_device_cannot_rotate(api: Api) -> None:
    dev, ing = active_device(api, 1)
    rid = sent(api, dev)
    sec = api.headers(Role.security)
    r = api.client.post("/devices/%s/state" % dev.id, json={"state": "quarantined"},
                        headers=sec)
    assert r.status_code == 200, r.text
    # its key is suspended: its proof is refused, and audited
    data = csr_message(dev.signer, dev.id, rid, EcSigner.generate())
    got = ing.handle(csr_topic(dev.id), data)
    assert got.status == rotation_ingest.CSR_BAD_PROOF
    assert audit_actions(api.engine, "rotation.csr") == [("rotation.csr", "refused")]
    r = start(api, dev)
    assert r.status_code == 409 and "quarantined" in r.json()["detail"]
    assert ("rotation.start", "refused") in audit_actions(api.engine, "rotation.start")
    # revoked: the same
    other, ing2 = active_device(api, 2)
    rid2 = sent(api, other)
    r = api.client.post("/devices/%s/revoke" % other.id, json={"reason": "key-compromise"},
                        headers=sec)
    assert r.status_code == 200, r.text
    assert rotation_row(api.engine, rid2).state == "failed"
    data = csr_message(other.signer, other.id, rid2, EcSigner.generate())
    assert ing2.handle(csr_topic(other.id), data).status == rotation_ingest.CSR_BAD_PROOF
    assert start(api, other).status_code == 409


@pytest.mark.parametrize("role", [Role.technician, Role.viewer, Role.release_manager,
                                  Role.vendor])
def test_only_the_security_role_rotates_or_revokes(api: Api, role: Role) -> None:
    dev, _ = active_device(api)
    assert start(api, dev, role).status_code == 403
    r = api.client.post("/devices/%s/revoke" % dev.id, json={}, headers=api.headers(role))
    assert r.status_code == 403
    assert api.client.get("/devices/%s/rotations" % dev.id,
                          headers=api.headers(Role.viewer)).json() == []


def test_the_rotation_commands_are_sent_by_a_rotation_only(api: Api) -> None:
    dev, _ = active_device(api)
    for name in (rotation.ROTATE, rotation.INSTALL_CERT, rotation.ERASE_KEY):
        r = api.client.post("/devices/%s/commands" % dev.id,
                            json={"name": name, "args": {"1": 1}},
                            headers=api.headers(Role.security))
        assert r.status_code == 422, r.text


def test_one_open_rotation_at_a_time_and_a_refused_rotate_fails_it(api: Api) -> None:
    dev, ing = active_device(api)
    rid = sent(api, dev)
    assert start(api, dev).status_code == 409
    rot = rotation_row(api.engine, rid)
    cmd = command_row(api.engine, rot.rotate_command_id)
    no = command.encode_result(dev.signer, dev.signer.kid, rotation.ROTATE, dev.id, cmd.seq,
                               "refused", "no second key slot")
    assert ing.handle("ce/v1/%s/up/result" % dev.id, no).status == "result"
    rot = rotation_row(api.engine, rid)
    assert rot.state == "failed" and "no second key slot" in rot.reason
    assert start(api, dev).status_code == 201


def test_emergency_revocation_cuts_every_certificate_and_the_ingest_refuses_at_once(
        api: Api) -> None:
    dev, ing = active_device(api)
    rid = sent(api, dev)
    new = EcSigner.generate()
    assert ing.handle(csr_topic(dev.id), csr_message(dev.signer, dev.id, rid, new)).status \
        == rotation_ingest.CSR_TAKEN  # two active certificates now
    queued = dev.sign()  # signed before the revocation, arriving after it
    r = api.client.post("/devices/%s/revoke" % dev.id,
                        json={"reason": "key-compromise", "note": "cabinet opened"},
                        headers=api.headers(Role.security))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "quarantined" and len(body["revoked"]) == 2
    assert body["crl_serials"] == 2
    assert set(credentials(api, dev.id).values()) == {"revoked"}
    assert ing.handle(dev.topic, queued).status == NOT_ACCEPTING
    dev.writer.signer, dev.writer.kid = new, new.kid
    assert ing.handle(dev.topic, dev.sign()).status == NOT_ACCEPTING
    assert rotation_row(api.engine, rid).state == "failed"
    assert ("device.revoke", "ok") in audit_actions(api.engine, "device.revoke")
    # reactivating does not bring a revoked certificate back
    r = api.client.post("/devices/%s/state" % dev.id, json={"state": "active"},
                        headers=api.headers(Role.security))
    assert r.status_code == 200
    assert set(credentials(api, dev.id).values()) == {"revoked"}
    r = api.client.post("/devices/urn:dev:mac:00000000000000ff/revoke", json={},
                        headers=api.headers(Role.security))
    assert r.status_code == 404
    # a device registered but never enrolled has nothing to revoke (found by the fuzzer:
    # it was a server error)
    body = {"id": "urn:dev:mac:00000000000000fe", "serial": "NEVER-1", "model": "m",
            "hardware_class": "esp32"}
    assert api.client.post("/devices", json=body,
                           headers=api.headers(Role.technician)).status_code == 201
    r = api.client.post("/devices/%s/revoke" % body["id"], json={},
                        headers=api.headers(Role.security))
    assert r.status_code == 409 and "not enrolled" in r.json()["detail"]


def test_a_rotate_command_that_expires_fails_the_rotation(api: Api) -> None:
    """A device that never answers (a firmware without rotation, a device away for good):
    the fleet gives up on the command and the rotation fails, revoking nothing."""
    dev, _ing = active_device(api)
    rid = sent(api, dev)
    cmd = command_row(api.engine, rotation_row(api.engine, rid).rotate_command_id)
    with Session(api.engine) as s:
        later = cmd.expires_at + dt.timedelta(seconds=1)
        assert [c.id for c in fleet_rotation.expire_commands(s, later)] == [cmd.id]
        s.commit()
    rot = rotation_row(api.engine, rid)
    assert rot.state == "failed" and "rotate expired" in rot.reason
    assert credentials(api, dev.id) == {dev.signer.kid.hex(): "active"}


def test_a_group_with_many_csrs_is_stored_in_parts_in_order(api: Api) -> None:
    """A whole fleet rotating at once sends CSRs in bulk: a group is decided in parts of at
    most ``ingest_group_max_rotation_steps`` CSRs taken or rotations proven (each a CA
    signature or revocations, and a command), so no transaction holds the database for
    long; every outcome comes back in order."""
    devs = [active_device(api, i)[0] for i in range(1, 6)]
    lim = api.settings.limits.model_copy(update={"ingest_group_max_rotation_steps": 2})
    ing = Ingestor(api.engine, api.settings.model_copy(update={"limits": lim}))
    messages: list[tuple[str, bytes]] = []
    for dev in devs:
        rid = sent(api, dev)
        messages.append((csr_topic(dev.id), csr_message(dev.signer, dev.id, rid,
                                                        EcSigner.generate())))
        messages.append((dev.topic, dev.sign()))
    commits: list[int] = []
    listen = (api.engine, "commit", lambda _conn: commits.append(1))
    event.listen(*listen)
    try:
        outcomes = ing.handle_many(messages)
    finally:
        event.remove(*listen)
    assert len(commits) == 3  # CSRs 1-2, 3-4, 5: two rotation steps per transaction
    assert [(o.status, o.device) for o in outcomes] == [
        s for dev in devs for s in ((rotation_ingest.CSR_TAKEN, dev.id), (chain.OK, dev.id))]
    with Session(api.engine) as s:
        assert len(s.exec(select(Credential).where(
            col(Credential.status) == "active")).all()) == 10  # old and new, each device
