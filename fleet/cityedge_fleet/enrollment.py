"""Gated enrollment: a device's CSR is signed only against a valid, unused, unexpired
enrollment token for its serial, or against its serial on a vendor's allow-list.

``enroll`` is the one place that decides. Each gate is used at most once: the token (or
allow-list entry) is consumed with a conditional UPDATE, so two concurrent requests with
the same token cannot both succeed. Refusals raise ``EnrollmentRefused`` carrying the HTTP
status and a message for the device; the caller audits them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlmodel import Session, col, select

from cityedge_core.chain import ChainState
from cityedge_core.cose import kid_for_public_key
from cityedge_core.errors import PeerError
from cityedge_fleet import registry
from cityedge_fleet.auth import hash_token, new_token
from cityedge_fleet.ca import CertificateAuthority, CsrError
from cityedge_fleet.config import Settings
from cityedge_fleet.models import (
    AllowedSerial,
    ChainStateRow,
    Credential,
    Device,
    DeviceState,
    EnrollmentToken,
    EnrollRequest,
    EnrollResponse,
)
from cityedge_fleet.registry import TransitionError


class EnrollmentRefused(PeerError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def issue_token(session: Session, *, serial: str, ttl_s: int, created_by: str) -> tuple[
        EnrollmentToken, str]:
    token = new_token()
    row = EnrollmentToken(
        token_hash=hash_token(token), serial=serial, created_by=created_by,
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_s))
    session.add(row)
    session.flush()
    return row, token


def allow_serials(session: Session, *, manifest: str, serials: list[str], added_by: str
                  ) -> tuple[int, int]:
    """Add a delivery manifest's serials to the allow-list; returns (added, already)."""
    added = already = 0
    for serial in dict.fromkeys(serials):
        if session.get(AllowedSerial, serial) is not None:
            already += 1
            continue
        session.add(AllowedSerial(serial=serial, manifest=manifest, added_by=added_by))
        added += 1
    session.flush()
    return added, already


def _consume_gate(session: Session, req: EnrollRequest, now: dt.datetime) -> str:
    """Check and use up the token or allow-list entry; returns how the device got in."""
    if req.token is not None:
        row = session.exec(select(EnrollmentToken).where(
            EnrollmentToken.token_hash == hash_token(req.token))).first()
        if row is None:
            raise EnrollmentRefused(403, "unknown enrollment token")
        if row.serial != req.serial:
            raise EnrollmentRefused(403, "the enrollment token was issued for another serial")
        if row.used_at is not None:
            raise EnrollmentRefused(403, "the enrollment token was already used")
        if row.expires_at <= now:
            raise EnrollmentRefused(403, "the enrollment token has expired")
        done = session.execute(
            update(EnrollmentToken)
            .where(col(EnrollmentToken.id) == row.id, col(EnrollmentToken.used_at).is_(None))
            .values(used_at=now))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise EnrollmentRefused(403, "the enrollment token was already used")
        return "token"
    allowed = session.get(AllowedSerial, req.serial)
    if allowed is None:
        raise EnrollmentRefused(403, "no enrollment token and the serial is not allow-listed")
    done = session.execute(
        update(AllowedSerial)
        .where(col(AllowedSerial.serial) == req.serial, col(AllowedSerial.used_at).is_(None))
        .values(used_at=now))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise EnrollmentRefused(403, "the allow-listed serial was already enrolled")
    return "allow-list:%s" % allowed.manifest


def device_config(device: Device, settings: Settings, kid: bytes) -> dict[str, Any]:
    base = "ce/v1/%s/" % device.id
    validity_s = settings.limits.cert_validity_days * 86400
    return {
        "device_id": device.id,
        "kid": kid.hex(),
        "broker_url": settings.broker_url,
        "topics": {
            "readings": base + "up/readings",
            "status": base + "up/status",
            "commands": base + "down/cmd",
            "desired": base + "down/desired",
        },
        "renew_after_s": validity_s * 2 // 3,  # renew at 2/3 of the lifetime (plus jitter)
    }


def enroll(session: Session, *, ca: CertificateAuthority, settings: Settings,
           req: EnrollRequest) -> tuple[Device, Credential, EnrollResponse, str]:
    """Sign the CSR if the gate allows; returns device, credential, response and the gate.

    Everything happens in the session's transaction; the caller commits on success and
    rolls back on ``EnrollmentRefused``.
    """
    now = dt.datetime.now(dt.UTC)
    device = registry.get_by_serial(session, req.serial)
    if device is None:
        raise EnrollmentRefused(403, "serial %s is not registered" % req.serial)
    gate = _consume_gate(session, req, now)
    try:
        registry.check_transition(DeviceState(device.state), DeviceState.provisioned)
    except TransitionError as e:
        raise EnrollmentRefused(409, "device is %s: %s" % (device.state, e)) from e
    try:
        cert = ca.sign_csr(req.csr_pem, device.id, days=settings.limits.cert_validity_days)
    except CsrError as e:
        raise EnrollmentRefused(422, str(e)) from e
    sec1 = cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    kid = kid_for_public_key(sec1)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    credential = registry.add_credential(session, credential=Credential(
        device_id=device.id, serial="%x" % cert.serial_number, kid=kid.hex(),
        public_key=sec1.hex(), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, cert_pem=cert_pem))
    registry.set_state(session, device=device, state=DeviceState.provisioned)
    if session.get(ChainStateRow, device.id) is None:
        # the ingest locks this row (FOR UPDATE) for each batch; it must exist before the first
        session.add(ChainStateRow(device_id=device.id, state=ChainState().to_bytes(),
                                  last_seq=0))
    response = EnrollResponse(
        device_id=device.id, certificate_pem=cert_pem, chain_pem=cert_pem + ca.chain_pem(),
        ca_bundle_pem=ca.bundle_pem(), broker_url=settings.broker_url,
        config=device_config(device, settings, kid))
    return device, credential, response, gate
