"""Enrollment by a device holding an offline ticket: ``POST /enroll/ticket``.

A technician provisioning offline hands the device a *ticket*: the one-time enrollment
token fetched beforehand, this URL, and what to register. Two parties may then redeem the
same token, in either order: the device itself (when its network comes up) and the
technician's laptop (``cityedge provision sync``). Both call this endpoint, and both end
with the *same* single credential:

1. if the serial is not registered yet, the token's holder registers it (device id = the
   CSR's URN, model, hardware class, site from ``registration``). The token was issued to a
   technician for exactly this serial, so holding it is the technician's delegation; a
   token for another serial, used or expired registers nothing.
2. ``enrollment.enroll`` (the one place that decides) signs the CSR and uses the token up.
3. if it refuses because the token *was already used*, the CSR passes the CA's own check
   (``CertificateAuthority.check_csr``: P-256, a valid self-signature, so the caller holds
   the private key, CN = the device id) and the device's active credential holds the CSR's
   public key, the issued certificate is returned again (header ``X-Cityedge-Enrollment:
   existing``): the key holder gets its certificate, no second credential exists.

Every refusal before the gate is passed (unknown, foreign, used or expired token,
unregistered serial; a used token whose CSR is not the enrolled key's) is the same 403
``enrollment.REFUSED``, so a token or serial cannot be probed; the audit row has the
reason. After the gate, errors are precise (409 wrong state or key enrolled, 422 bad CSR).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import Field
from sqlmodel import Session, col, select

from cityedge_fleet import audit, enrollment, registry
from cityedge_fleet.api.deps import (
    BrokerDep,
    CaDep,
    SettingsDep,
    TrustStoreDep,
    grant_before_commit,
)
from cityedge_fleet.auth import client_address, hash_token
from cityedge_fleet.ca import CertificateAuthority, CsrError
from cityedge_fleet.config import Settings
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import (
    TEXT_MAX,
    Credential,
    Device,
    DeviceCreate,
    EnrollmentToken,
    EnrollRequest,
    EnrollResponse,
    InputModel,
)

router = APIRouter(tags=["enrollment"])

class TicketRegistration(InputModel):
    """What the technician chose for the device, carried in the ticket."""

    id: str = Field(max_length=128)
    model: str = Field(min_length=1, max_length=TEXT_MAX)
    hardware_class: str = Field(default="", max_length=TEXT_MAX)
    site: str = Field(default="", max_length=TEXT_MAX)
    firmware_version: str = Field(default="", max_length=TEXT_MAX)


class TicketEnrollRequest(InputModel):
    serial: str = Field(min_length=1, max_length=TEXT_MAX)
    token: str = Field(min_length=1, max_length=128)
    csr_pem: str = Field(min_length=1, max_length=8192)
    registration: TicketRegistration | None = None


def _token_row(session: Session, token: str) -> EnrollmentToken | None:
    return session.exec(select(EnrollmentToken).where(
        EnrollmentToken.token_hash == hash_token(token))).first()


def _register_if_absent(session: Session, body: TicketEnrollRequest) -> bool:
    if body.registration is None or registry.get_by_serial(session, body.serial) is not None:
        return False
    row = _token_row(session, body.token)
    if row is None or row.serial != body.serial or row.used_at is not None or \
            row.expires_at <= dt.datetime.now(dt.UTC):
        return False  # enroll() refuses it, and audits the precise reason
    reg = body.registration
    try:
        registry.create_device(session, data=DeviceCreate(
            id=reg.id, serial=body.serial, model=reg.model,
            hardware_class=reg.hardware_class or reg.model, site=reg.site,
            firmware_version=reg.firmware_version))
    except (registry.ConflictError, ValueError) as e:
        raise HTTPException(409, "cannot register the device: %s" % e) from e
    return True


def _existing(session: Session, ca: CertificateAuthority, settings: Settings,
              body: TicketEnrollRequest, fleet_keys: list[str]) -> EnrollResponse | None:
    """The credential already issued for this token's serial and the CSR's key, if any:
    only for a CSR the CA itself would accept (signed by its key, for this device)."""
    row = _token_row(session, body.token)
    device = registry.get_by_serial(session, body.serial)
    if row is None or row.serial != body.serial or row.used_at is None or device is None:
        return None
    try:
        csr: x509.CertificateSigningRequest = ca.check_csr(body.csr_pem, device.id)
    except CsrError:
        return None  # unsigned, someone else's key, not P-256, another CN
    sec1 = csr.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)
    cred = session.exec(select(Credential).where(
        col(Credential.device_id) == device.id, col(Credential.public_key) == sec1.hex(),
        col(Credential.status) == "active")).first()
    if cred is None:
        return None
    return EnrollResponse(
        device_id=device.id, certificate_pem=cred.cert_pem,
        chain_pem=cred.cert_pem + ca.chain_pem(cred.issuer),
        ca_bundle_pem=ca.device_trust_pem(),
        broker_url=settings.broker_url,
        config=enrollment.device_config(device, settings, bytes.fromhex(cred.kid)),
        fleet_keys=fleet_keys,
        trust_statement=enrollment.hand_out_statement(session, device))


def _trust_version(session: Session, answer: EnrollResponse) -> int | None:
    """The statement version ``answer`` handed out, as recorded on its device."""
    device = session.get(Device, answer.device_id)
    return None if device is None else device.trust_version


@router.post("/enroll/ticket", response_model=EnrollResponse,
             responses={403: {}, 409: {}, 422: {}, 429: {}, 503: {}})
def enroll_with_ticket(body: TicketEnrollRequest, request: Request, response: Response,
                       session: SessionDep, settings: SettingsDep, ca: CaDep,
                       broker: BrokerDep, fleet_keys: TrustStoreDep) -> Any:
    """Enroll with an offline ticket's token, or return what that token already got."""
    source = client_address(request)
    actor = "device:%s" % body.serial
    if not request.app.state.enroll_limiter.take(source):
        raise HTTPException(429, "too many enrollment attempts; retry later")
    registered = _register_if_absent(session, body)
    req = EnrollRequest(serial=body.serial, token=body.token, csr_pem=body.csr_pem)
    try:
        device, cred, answer, gate = enrollment.enroll(session, ca=ca, settings=settings,
                                                       req=req, fleet_keys=fleet_keys)
    except enrollment.EnrollmentRefused as e:
        session.rollback()
        existing = _existing(session, ca, settings, body, fleet_keys) \
            if e.code == enrollment.USED_UP else None
        if existing is not None:
            audit.append(session, actor=actor, action="enroll.ticket.claim",
                         outcome=audit.OK, target=existing.device_id, source=source,
                         detail={"kid": existing.config.get("kid"),
                                 "trust_version": _trust_version(session, existing)})
            session.commit()
            response.headers["X-Cityedge-Enrollment"] = "existing"
            return existing
        audit.record(session, actor=actor, action="enroll.ticket", outcome=audit.REFUSED,
                     target=body.serial, source=source,
                     detail={"why": e.why, "code": e.code, "status": e.status})
        raise HTTPException(e.status, e.public) from e
    grant_before_commit(session, broker, device.id, actor=actor, source=source)
    audit.append(session, actor=actor, action="enroll.ticket", outcome=audit.OK,
                 target=device.id, source=source,
                 detail={"gate": gate, "cert_serial": cred.serial, "kid": cred.kid,
                         "registered": registered, "trust_version": device.trust_version})
    session.commit()
    response.headers["X-Cityedge-Enrollment"] = "issued"
    return answer
