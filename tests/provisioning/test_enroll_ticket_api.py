"""The fleet's ``POST /enroll/ticket`` over HTTP (the real service on loopback): who may
register, and that redeeming a used token never yields a second credential or someone
else's certificate."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_server import FleetServer
from sqlmodel import Session, col, select

from cityedge_fleet import command_key_rotation as ckr
from cityedge_fleet import enrollment
from cityedge_fleet.models import AuditRecord, CommandKeyRotation, Credential, Device

URN = "urn:dev:mac:0024befffe800a01"


def csr_pem(urn: str = URN) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    req = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, urn)])).sign(key, hashes.SHA256())
    return req.public_bytes(serialization.Encoding.PEM).decode()


def token_for(fleet: FleetServer, serial: str) -> str:
    with Session(fleet.app.state.engine) as s:
        _, tok = enrollment.issue_token(s, serial=serial, ttl_s=600, created_by="tech")
        s.commit()
    return tok


def post(fleet: FleetServer, **body: Any) -> httpx.Response:
    return httpx.post(fleet.url + "/enroll/ticket", json=body, timeout=10)


REG = {"id": URN, "model": "ce-sim-1", "site": "harbour"}


def test_register_enroll_then_claim_with_the_same_key_only(fleet: FleetServer) -> None:
    tok = token_for(fleet, "SN-A01")
    csr = csr_pem()
    first = post(fleet, serial="SN-A01", token=tok, csr_pem=csr, registration=REG)
    assert first.status_code == 200, first.text
    assert first.headers["X-Cityedge-Enrollment"] == "issued"
    again = post(fleet, serial="SN-A01", token=tok, csr_pem=csr)
    assert again.status_code == 200 and again.headers["X-Cityedge-Enrollment"] == "existing"
    assert again.json()["certificate_pem"] == first.json()["certificate_pem"]
    # the used token with another key: refused, no second credential
    other = post(fleet, serial="SN-A01", token=tok, csr_pem=csr_pem())
    assert (other.status_code, other.json()) == (403, {"detail": "enrollment refused"})
    with Session(fleet.app.state.engine) as s:
        device = s.get(Device, URN)
        assert device is not None and device.site == "harbour" and device.serial == "SN-A01"
        assert len(s.exec(select(Credential).where(Credential.device_id == URN)).all()) == 1


def test_a_bad_token_registers_nothing(fleet: FleetServer) -> None:
    tok = token_for(fleet, "SN-A02")
    for serial, token in (("SN-A03", tok), ("SN-A02", "not-a-token")):
        res = post(fleet, serial=serial, token=token, csr_pem=csr_pem(),
                   registration=dict(REG, id="urn:dev:mac:0024befffe800a02"))
        assert res.status_code == 403, res.text
    # a CSR for another device id than the registration: refused and rolled back
    res = post(fleet, serial="SN-A02", token=tok, csr_pem=csr_pem("urn:dev:mac:0024befffe800a09"),
               registration=dict(REG, id="urn:dev:mac:0024befffe800a02"))
    assert res.status_code == 422, res.text
    with Session(fleet.app.state.engine) as s:
        assert s.exec(select(Device)).all() == []
    res = post(fleet, serial="SN-A02", token=tok, csr_pem=csr_pem("urn:dev:mac:0024befffe800a02"),
               registration=dict(REG, id="urn:dev:mac:0024befffe800a02"))
    assert res.status_code == 200, res.text  # the token was not used up by the refusals


def test_a_ticket_enrollment_records_the_statement_it_hands_out(fleet: FleetServer) -> None:
    """A device that enrolls itself with an offline ticket during a command-key rotation is
    handed the statement; the fleet records the version on the device and in the audit
    row (issued and claimed again alike), and the rotation counts the device as installed
    (``command_key_rotation.enrolled_with``)."""
    engine = fleet.app.state.engine
    with Session(engine) as s:
        rot = CommandKeyRotation(
            version=3, statement=b"the root's statement", statement_sha256="0" * 64,
            old_kid="00" * 8, new_kid="11" * 8, threshold_pct=100, created_by="test",
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        s.add(rot)
        s.commit()
    tok = token_for(fleet, "SN-A04")
    csr = csr_pem("urn:dev:mac:0024befffe800a04")
    reg = dict(REG, id="urn:dev:mac:0024befffe800a04")
    for how in ("issued", "existing"):
        res = post(fleet, serial="SN-A04", token=tok, csr_pem=csr, registration=reg)
        assert res.status_code == 200 and res.headers["X-Cityedge-Enrollment"] == how
        assert base64.b64decode(res.json()["trust_statement"]) == b"the root's statement"
    with Session(engine) as s:
        device = s.get(Device, reg["id"])
        assert device is not None and device.trust_version == 3
        details = [json.loads(a.detail) for a in s.exec(select(AuditRecord).where(
            col(AuditRecord.action).startswith("enroll.ticket"),
            col(AuditRecord.outcome) == "ok").order_by(col(AuditRecord.id)))]
        assert [d["trust_version"] for d in details] == [3, 3]
        row = s.exec(select(CommandKeyRotation)).one()
        assert ckr.enrolled_with(s, row) == {reg["id"]}
