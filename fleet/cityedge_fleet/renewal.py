"""Certificate renewal: every device gets a new key and certificate at about 2/3 of its
certificate's lifetime, by the ordinary key rotation (``rotation.start_rotation``: a new
key each time, the old certificate revoked only once the new one is proven in use).

**When** (``due_at``): ``notBefore + lifetime * 2/3 + jitter``, the jitter in
``[-lifetime/12, +lifetime/12)`` taken from the SHA-256 of the certificate's serial. So a
fleet enrolled in one day renews spread over a sixth of the lifetime (15 days for 90-day
certificates), the same certificate always has the same date (a restart does not move it,
a test can name it), and the renewal still lands with a quarter of the lifetime left at
the latest.

**A round** (``renewal_round``, run by ``fleet serve``'s campaign runner every
``RenewalLimits.every_s``; an injected clock in the tests), over active devices and their
current certificate (the newest active one):

1. a certificate already expired is never renewed by the fleet: the device cannot reach
   the broker, and a new key proven by an expired one would be a silent re-enrollment.
   It is flagged once (``key_expiry_flag``, audit ``renewal.expired``), listed as
   ``expired`` by ``keys report``, left out of campaigns, and its way back needs a
   technician (docs/SECURITY_TEAM.md "Renewal");
2. a device with a rotation open (an operator's, a campaign's, an earlier renewal's) is
   left alone: that rotation renews it; so is one a running or paused campaign has yet
   to rotate (the campaign will: two rotations would replace the key twice);
3. a device whose last rotation failed less than ``retry_after_fail_s`` ago is left alone
   (a device away for a day costs one rotate command a day, not one a round);
4. the due ones, most overdue first, at most ``round_max`` per round, get a rotation
   started by ``renewal`` (audited by ``rotation``). A device offline at that moment
   renews when it comes back: the command publisher sends its rotate command then.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Field, Session, SQLModel, col, select

from cityedge_fleet import audit, command_queue, rotation
from cityedge_fleet.campaign import CampaignState, MemberStatus
from cityedge_fleet.campaign_store import CampaignMember, RotationCampaign, current_credentials
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import (
    OPEN_ROTATIONS,
    Credential,
    Device,
    DeviceState,
    KeyRotation,
    RotationState,
    UTCDateTime,
    utcnow,
)
from cityedge_host.crypto import EcSigner

ACTOR = "renewal"


@dataclass(frozen=True)
class RenewalLimits:
    """Limits of automatic renewal, each with its unit."""

    every_s: float = 600.0  # seconds between renewal rounds in fleet serve
    round_max: int = 50  # rotations one round starts at most
    retry_after_fail_s: float = 86400.0  # seconds after a failed rotation before another
    at_fraction: float = 2 / 3  # of the lifetime: when a certificate is due
    jitter_fraction: float = 1 / 12  # of the lifetime, either side of that


LIMITS = RenewalLimits()


class KeyExpiryFlag(SQLModel, table=True):
    """A device whose certificate expired before it was renewed (rule 1)."""

    __tablename__ = "key_expiry_flag"
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128)
    serial: str = Field(primary_key=True, max_length=64)
    not_after: dt.datetime = Field(sa_type=UTCDateTime)
    flagged_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


def jitter(serial: str) -> float:
    """A fixed number in [-1, 1) for a certificate serial."""
    h = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:8], "big")
    return h / 2**63 - 1.0


def due_at(cred: Credential, lim: RenewalLimits = LIMITS) -> dt.datetime:
    """When ``cred`` is due for renewal (module docstring)."""
    life = (cred.not_after - cred.not_before).total_seconds()
    at = life * lim.at_fraction + life * lim.jitter_fraction * jitter(cred.serial)
    return cred.not_before + dt.timedelta(seconds=at)


@dataclass
class RoundResult:
    started: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)  # expired, flagged this round
    due: int = 0  # devices due (started or not: over round_max, refused)
    refused: dict[str, str] = field(default_factory=dict)  # device -> why not started


def renewal_round(session: Session, *, signer: EcSigner, lim: FleetLimits,
                  now: dt.datetime | None = None, rl: RenewalLimits = LIMITS) -> RoundResult:
    """One round (rules in the module docstring), in the caller's transaction."""
    now = now or utcnow()
    out = RoundResult()
    creds = current_credentials(session)
    active = set(session.exec(select(Device.id).where(
        col(Device.state) == DeviceState.active)))
    open_ = set(session.exec(select(KeyRotation.device_id).where(
        col(KeyRotation.state).in_(OPEN_ROTATIONS))))
    since = now - dt.timedelta(seconds=rl.retry_after_fail_s)
    failed_lately = set(session.exec(select(KeyRotation.device_id).where(
        col(KeyRotation.state) == RotationState.failed, col(KeyRotation.updated_at) > since)))
    flagged = {(f.device_id, f.serial) for f in session.exec(select(KeyExpiryFlag))}
    campaigned = set(session.exec(
        select(CampaignMember.device_id)
        .join(RotationCampaign, col(RotationCampaign.id) == CampaignMember.campaign_id)
        .where(col(RotationCampaign.state).in_((CampaignState.running, CampaignState.paused)),
               col(CampaignMember.status).not_in((MemberStatus.done, MemberStatus.failed)))))
    due: list[tuple[dt.datetime, str]] = []
    for device_id, cred in creds.items():
        if device_id not in active:
            continue
        if cred.not_after <= now:  # 1
            if (device_id, cred.serial) not in flagged:
                session.add(KeyExpiryFlag(device_id=device_id, serial=cred.serial,
                                          not_after=cred.not_after, flagged_at=now))
                audit.append(session, actor=ACTOR, action="renewal.expired",
                             outcome=audit.REFUSED, target=device_id,
                             detail={"serial": cred.serial,
                                     "not_after": cred.not_after.isoformat(),
                                     "why": "certificate expired before renewal: a "
                                            "technician must bring the device back"})
                out.flagged.append(device_id)
            continue
        if device_id in open_ or device_id in campaigned or device_id in failed_lately:
            continue
        at = due_at(cred, rl)
        if at <= now:
            due.append((at, device_id))
    due.sort()
    out.due = len(due)
    for _at, device_id in due[:rl.round_max]:  # 4
        try:
            with session.begin_nested():
                rotation.start_rotation(session, device_id, by=ACTOR, signer=signer, lim=lim)
        except (rotation.RotationError, command_queue.CommandError) as e:
            out.refused[device_id] = str(e)
            continue
        out.started.append(device_id)
    return out


def expired_flags(session: Session) -> list[KeyExpiryFlag]:
    return list(session.exec(select(KeyExpiryFlag).order_by(col(KeyExpiryFlag.flagged_at))))


def key_report(session: Session, *, now: dt.datetime | None = None,
               rl: RenewalLimits = LIMITS, campaigns_max: int = 20) -> dict[str, Any]:
    """Key age and certificate expiry across the fleet (``keys report``, ``GET
    /keys/report``): per active device its current key's age, expiry, renewal date and
    open rotation; ``overdue`` (due, nothing open), ``expired`` (rule 1: needs a
    technician); and the newest campaigns with their counts."""
    from cityedge_fleet import campaign_store  # the report reads both; store never imports us

    now = now or utcnow()
    creds = current_credentials(session)
    open_rot = {r.device_id: str(r.state) for r in session.exec(select(KeyRotation).where(
        col(KeyRotation.state).in_(OPEN_ROTATIONS)))}
    devices: list[dict[str, Any]] = []
    summary = {"devices": 0, "no_certificate": 0, "overdue": 0, "expired": 0,
               "rotating": 0, "due_30d": 0}
    for d in session.exec(select(Device).where(col(Device.state) == DeviceState.active)
                          .order_by(col(Device.id))):
        summary["devices"] += 1
        cred = creds.get(d.id)
        if cred is None:
            summary["no_certificate"] += 1
            devices.append({"device_id": d.id, "site": d.site, "status": "no-certificate"})
            continue
        due = due_at(cred, rl)
        rot = open_rot.get(d.id)
        if cred.not_after <= now:
            st = "expired"
        elif rot is not None:
            st = "rotating"
        elif due <= now:
            st = "overdue"
        else:
            st = "ok"
        if st in summary:
            summary[st] += 1
        if st == "ok" and (due - now).total_seconds() <= 30 * 86400:
            summary["due_30d"] += 1
        devices.append({
            "device_id": d.id, "site": d.site, "model": d.model, "status": st,
            "kid": cred.kid, "key_age_days": round((now - cred.not_before).total_seconds()
                                                   / 86400, 1),
            "cert_expires": cred.not_after.isoformat(),
            "expires_in_days": round((cred.not_after - now).total_seconds() / 86400, 1),
            "renewal_due": due.isoformat(), "rotation": rot})
    camps = []
    for c in campaign_store.campaigns(session, limit=campaigns_max):
        got = campaign_store.status(session, c.id or 0)
        camps.append({k: got[k] for k in ("id", "selector", "state", "reason", "wave",
                                         "waves", "members", "counts", "created_at")})
    return {"at": now.isoformat(), "summary": summary, "devices": devices,
            "campaigns": camps}
