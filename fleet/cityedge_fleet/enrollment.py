"""Gated enrollment: a device's CSR is signed only for a caller who proves it may enroll
that serial: a valid, unused, unexpired enrollment token issued for the serial, or an
allow-listed serial *with its claim secret*.

``enroll`` is the one place that decides. Its rules, in order (the first failure refuses):

1. the gate (``check_gate``) -- the serial is registered, and either
   a. a token was given: it exists (looked up by its SHA-256), was issued for this
      serial, is unused and unexpired; or
   b. no token: the serial is on a vendor's allow-list with a claim hash, the request
      carries the claim secret, SHA-256(claim) equals that hash (``hmac.compare_digest``)
      and the entry is unused.
   Every refusal here reads the same to the caller (``REFUSED``, 403), whatever the
   reason, so serials cannot be enumerated and the reply says nothing about the registry;
   the precise reason goes to the audit log (``EnrollmentRefused.why``). Each path does
   the same lookups and hashes the presented token and claim, so the time taken does not
   tell the reasons apart either.
2. the gate is used up with a conditional UPDATE (``used_at IS NULL``), so two concurrent
   requests with the same token or claim cannot both pass.
3. from here the caller has proved possession, and errors are precise: when the fleet
   requires hardware reports (``Settings.hw_report_profile``), the newest report of the
   device's model for its site's profile must meet it (403,
   ``hw_report_store.hardware_gate``; the audit row's gate then names the report); the
   device must be allowed to become ``provisioned`` (409), the CSR must pass
   ``CertificateAuthority.check_csr`` (422), and its key must not be enrolled already
   (409: the credential's ``kid`` is unique, a key serves one device once).

Claim secrets: the vendor writes a random secret of at least 128 bits into each device's
flash and gives the fleet only its SHA-256 (the delivery manifest, ``allow_serials``).
With that much entropy an unsalted fast hash is enough: a copy of the allow-list table
does not let anyone find a secret by guessing (2^128 tries), and no two devices share a
secret, so a salt or a slow hash would add nothing. The secret itself is never stored,
logged or echoed; the claim is used once, like a token.

Everything happens in the caller's transaction; the caller commits on success and rolls
back on ``EnrollmentRefused`` (so a refusal after rule 2 uses nothing up), then audits.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cityedge_core import topics
from cityedge_core.chain import ChainState
from cityedge_core.cose import kid_for_public_key
from cityedge_core.errors import PeerError
from cityedge_fleet import hw_report_store, registry
from cityedge_fleet.auth import hash_token, new_token
from cityedge_fleet.ca import CertificateAuthority, CsrError
from cityedge_fleet.config import Settings
from cityedge_fleet.models import (
    AllowedSerial,
    ChainStateRow,
    CommandKeyRotation,
    CommandKeyRotationState,
    Credential,
    Device,
    DeviceState,
    EnrollmentToken,
    EnrollRequest,
    EnrollResponse,
)
from cityedge_fleet.registry import TransitionError

REFUSED = "enrollment refused"  # the one answer to every refusal before the gate is passed
REFUSED_STATUS = 403
USED_UP = "token-used"  # ``EnrollmentRefused.code`` of a spent token (enroll_ticket)
_NO_HASH = "0" * 64  # compared against when there is no stored hash: the same work


class EnrollmentRefused(PeerError):
    """A refusal: the caller gets ``status`` and ``public``; the audit log gets ``why``
    (precise) and ``code`` (a stable name of the reason)."""

    def __init__(self, status: int, why: str, public: str | None = None,
                 code: str = "") -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.public = public if public is not None else why
        self.code = code


def _gate_refused(code: str, why: str) -> EnrollmentRefused:
    return EnrollmentRefused(REFUSED_STATUS, why, REFUSED, code)


def claim_hash(claim: str) -> str:
    """SHA-256 (hex) of a claim secret, as the vendor's manifest carries it."""
    return hashlib.sha256(claim.encode()).hexdigest()


def issue_token(session: Session, *, serial: str, ttl_s: int, created_by: str) -> tuple[
        EnrollmentToken, str]:
    token = new_token()
    row = EnrollmentToken(
        token_hash=hash_token(token), serial=serial, created_by=created_by,
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_s))
    session.add(row)
    session.flush()
    return row, token


class ClaimConflict(ValueError):
    """A manifest gives an allow-listed serial another claim than the one on file."""


def allow_serials(session: Session, *, manifest: str, claims: dict[str, str], added_by: str
                  ) -> tuple[int, int]:
    """Add a delivery manifest's ``{serial: claim SHA-256}`` to the allow-list; returns
    (added, already). An entry listed before claims existed (no hash) and not used yet
    takes the manifest's claim; an entry with another claim raises ``ClaimConflict``
    (nothing is changed: the caller rolls back)."""
    added = already = 0
    conflicts: list[str] = []
    for serial, digest in claims.items():
        row = session.get(AllowedSerial, serial)
        if row is None:
            session.add(AllowedSerial(serial=serial, manifest=manifest, added_by=added_by,
                                      claim_hash=digest))
            added += 1
        elif row.claim_hash is None and row.used_at is None:
            row.claim_hash, row.manifest, row.added_by = digest, manifest, added_by
            session.add(row)
            added += 1
        elif row.claim_hash is not None and hmac.compare_digest(row.claim_hash, digest):
            already += 1
        elif row.used_at is not None:
            already += 1  # enrolled already: its claim is spent whatever it was
        else:
            conflicts.append(serial)
    if conflicts:
        raise ClaimConflict("already allow-listed with another claim: %s%s"
                            % (", ".join(conflicts[:10]), " ..." if len(conflicts) > 10 else ""))
    session.flush()
    return added, already


def _token_row(session: Session, token: str | None) -> EnrollmentToken | None:
    digest = hash_token(token or "")  # hashed even when absent: the same work either way
    row = session.exec(select(EnrollmentToken).where(
        EnrollmentToken.token_hash == digest)).first()
    return row if token is not None else None


def check_gate(session: Session, req: EnrollRequest, now: dt.datetime
               ) -> tuple[Device, EnrollmentToken | None, AllowedSerial | None]:
    """Rule 1 of the module docstring: the device, and the token or allow-list entry that
    lets it in. Raises ``EnrollmentRefused`` (``REFUSED`` to the caller) otherwise."""
    device = registry.get_by_serial(session, req.serial)
    token = _token_row(session, req.token)
    allowed = session.get(AllowedSerial, req.serial)
    presented = claim_hash(req.claim or "")
    stored = allowed.claim_hash if allowed is not None and allowed.claim_hash else _NO_HASH
    claim_matches = hmac.compare_digest(presented, stored) and req.claim is not None \
        and stored != _NO_HASH
    if req.token is not None:
        if token is None:
            raise _gate_refused("token-unknown", "unknown enrollment token")
        if token.serial != req.serial:
            raise _gate_refused("token-foreign",
                                "the enrollment token was issued for another serial")
        if token.used_at is not None:
            raise _gate_refused(USED_UP, "the enrollment token was already used")
        if token.expires_at <= now:
            raise _gate_refused("token-expired", "the enrollment token has expired")
    elif allowed is None:
        raise _gate_refused("not-allow-listed",
                            "no enrollment token and the serial is not allow-listed")
    elif allowed.claim_hash is None:
        raise _gate_refused("claim-none-on-file", "the allow-list entry (manifest %s) has no "
                            "claim hash: upload the vendor's manifest with claims"
                            % allowed.manifest)
    elif req.claim is None:
        raise _gate_refused("claim-missing", "an allow-listed serial needs its claim secret")
    elif not claim_matches:
        raise _gate_refused("claim-wrong", "wrong claim secret for the allow-listed serial")
    elif allowed.used_at is not None:
        raise _gate_refused("claim-used", "the allow-listed serial's claim was already used")
    if device is None:  # the proof is good, but for a serial the registry does not know
        raise _gate_refused("unregistered", "serial %s is not registered" % req.serial)
    return device, token, None if req.token is not None else allowed


def _consume_gate(session: Session, req: EnrollRequest, now: dt.datetime) -> tuple[
        Device, str]:
    """Rules 1 and 2: check the gate and use it up; returns the device and how it got in."""
    device, token, allowed = check_gate(session, req, now)
    if token is not None:
        done = session.execute(
            update(EnrollmentToken)
            .where(col(EnrollmentToken.id) == token.id, col(EnrollmentToken.used_at).is_(None))
            .values(used_at=now))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise _gate_refused(USED_UP, "the enrollment token was already used")
        return device, "token"
    assert allowed is not None and allowed.claim_hash is not None  # check_gate made sure
    done = session.execute(
        update(AllowedSerial)
        .where(col(AllowedSerial.serial) == req.serial, col(AllowedSerial.used_at).is_(None),
               col(AllowedSerial.claim_hash) == allowed.claim_hash)
        .values(used_at=now))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise _gate_refused("claim-used", "the allow-listed serial's claim was already used")
    return device, "allow-list:%s" % allowed.manifest


def device_config(device: Device, settings: Settings, kid: bytes) -> dict[str, Any]:
    validity_s = settings.limits.cert_validity_days * 86400
    return {
        "device_id": device.id,
        "kid": kid.hex(),
        "broker_url": settings.broker_url,
        "topics": {
            "readings": topics.up(device.id, topics.READINGS),
            "status": topics.up(device.id, topics.STATUS),
            "commands": topics.down(device.id, topics.CMD),
            "desired": topics.down(device.id, topics.DESIRED),
        },
        "renew_after_s": validity_s * 2 // 3,  # renew at 2/3 of the lifetime (plus jitter)
    }


def hand_out_statement(session: Session, device: Device) -> str | None:
    """The newest trust statement the fleet rolled out (a command-key rotation not
    abandoned), base64 as the root signed it, for ``device``'s enrollment answer; None if
    there is none. Its version is recorded as ``device.trust_version`` (None: none handed
    out), in the caller's transaction: the fleet's own record of what it handed out, which
    a rotation counts as installed (``command_key_rotation.threshold_reached``)."""
    row = session.exec(select(CommandKeyRotation).where(
        col(CommandKeyRotation.state) != CommandKeyRotationState.abandoned)
        .order_by(col(CommandKeyRotation.version).desc())).first()
    device.trust_version = None if row is None else row.version
    session.add(device)
    return None if row is None else base64.b64encode(bytes(row.statement)).decode()


def enroll(session: Session, *, ca: CertificateAuthority, settings: Settings,
           req: EnrollRequest, fleet_keys: list[str]
           ) -> tuple[Device, Credential, EnrollResponse, str]:
    """Sign the CSR if the gate allows; returns device, credential, response and the gate.
    ``fleet_keys``: the trust store the device is handed (``command_key.trust_store``).

    Everything happens in the session's transaction; the caller commits on success and
    rolls back on ``EnrollmentRefused``.
    """
    now = dt.datetime.now(dt.UTC)
    device, gate = _consume_gate(session, req, now)
    hw_report, hw_refusal = hw_report_store.hardware_gate(session, settings, device)
    if hw_refusal is not None:
        raise EnrollmentRefused(403, hw_refusal.why, code=hw_refusal.code)
    if hw_report is not None:
        gate += "+hw-report:%s" % hw_report.id
    try:
        registry.check_transition(DeviceState(device.state), DeviceState.provisioned)
    except TransitionError as e:
        raise EnrollmentRefused(409, "device is %s: %s" % (device.state, e),
                                code="wrong-state") from e
    try:
        csr = ca.check_csr(req.csr_pem, device.id)
    except CsrError as e:
        raise EnrollmentRefused(422, str(e), code="bad-csr") from e
    kid = kid_for_public_key(csr.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    holder = session.exec(select(Credential).where(Credential.kid == kid.hex())).first()
    if holder is not None:
        raise _key_taken(kid, holder.device_id)
    cert = ca.sign_csr(req.csr_pem, device.id, days=settings.limits.cert_validity_days)
    sec1 = cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    try:
        credential = registry.add_credential(session, credential=Credential(
            device_id=device.id, serial="%x" % cert.serial_number, kid=kid.hex(),
            public_key=sec1.hex(), not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc, cert_pem=cert_pem, issuer=ca.id))
    except IntegrityError as e:  # the same key enrolled by a concurrent request
        raise _key_taken(kid, "(a concurrent enrollment)") from e
    registry.set_state(session, device=device, state=DeviceState.provisioned)
    if session.get(ChainStateRow, device.id) is None:
        # the ingest locks this row (FOR UPDATE) for each batch; it must exist before the first
        session.add(ChainStateRow(device_id=device.id, state=ChainState().to_bytes(),
                                  last_seq=0))
    response = EnrollResponse(
        device_id=device.id, certificate_pem=cert_pem, chain_pem=cert_pem + ca.chain_pem(),
        ca_bundle_pem=ca.device_trust_pem(), broker_url=settings.broker_url,
        config=device_config(device, settings, kid), fleet_keys=fleet_keys,
        trust_statement=hand_out_statement(session, device))
    return device, credential, response, gate


def _key_taken(kid: bytes, holder: str) -> EnrollmentRefused:
    """The CSR's key is enrolled already: a key serves one device, once. The caller passed
    the gate and holds that key, so it is told; which device holds it goes to the audit."""
    return EnrollmentRefused(409, "the CSR's public key (kid %s) is already enrolled, for %s"
                             % (kid.hex(), holder),
                             public="the CSR's public key (kid %s) is already enrolled: "
                             "a device needs a key of its own" % kid.hex(), code="key-taken")
