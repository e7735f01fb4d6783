"""Rotation campaigns in the database: the tables, the selection, and one round of a
campaign (``advance``) — the policy itself is ``campaign.decide`` (I/O-free), each
device's rotation is ``rotation.start_rotation``.

- ``preview`` evaluates a selector over the registry: the devices a campaign would take
  (active, with an active certificate that has not expired) and, counted by reason, the
  matching ones it leaves out (not active; no certificate; certificate expired: those need
  a technician, ``renewal``).
- ``create`` stores the campaign and its members in selection order (the selection is
  taken once: a device is a member of a campaign once, in at most one wave), audited
  ``campaign.create``; a selection over ``CampaignLimits.confirm_over`` devices needs
  ``confirmed`` (the CLI's ``--yes``, the API's ``confirm``), so a selector that matches
  the whole fleet by mistake is caught before anything starts.
- ``advance`` (the runner, every few seconds; the campaign row locked) reads each started
  member's latest rotation, derives its status (``campaign.member_status``), asks
  ``campaign.decide`` and applies the plan: starts rotations (by ``campaign:<id>``), moves
  the campaign's state; every start, refusal and state change is audited.
- ``act``: pause, resume, abort (audited); an abort also fails the rotations of its
  members that have not reached their device (the rotate command cancelled).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import AutoString, Field, Session, SQLModel, col, select

from cityedge_fleet import audit, command_queue, rotation
from cityedge_fleet import campaign as policy
from cityedge_fleet.ca import issuer_id_of_pem
from cityedge_fleet.campaign import (
    CampaignError,
    CampaignLimits,
    CampaignState,
    DeviceFacts,
    Member,
    MemberStatus,
    Plan,
)
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import (
    EVENT_DETAIL_MAX,
    TEXT_MAX,
    Credential,
    CredentialStatus,
    Device,
    DeviceState,
    DeviceTag,
    FleetCommand,
    KeyRotation,
    UTCDateTime,
    utcnow,
)
from cityedge_host.crypto import EcSigner

M = MemberStatus


class RotationCampaign(SQLModel, table=True):
    __tablename__ = "rotation_campaign"
    id: int | None = Field(default=None, primary_key=True)
    selector: str = Field(max_length=1024)  # canonical (``Selector.text``)
    state: CampaignState = Field(default=CampaignState.running, index=True,
                                 sa_type=AutoString(16))
    wave_size: int
    wave: int = 0  # the current wave (0: none started yet)
    max_failures: str = Field(max_length=16)  # as given: "5%" or "5"
    allowed_failures: int  # failures it takes; one more halts it
    members: int
    reason: str = Field(default="", max_length=EVENT_DETAIL_MAX)  # why halted/aborted/done
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CampaignMember(SQLModel, table=True):
    __tablename__ = "campaign_member"
    campaign_id: int = Field(primary_key=True, foreign_key="rotation_campaign.id")
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128,
                           index=True)
    position: int  # selection order: waves take members in this order
    wave: int | None = None
    attempts: int = 0  # rotations started for it
    next_try_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    rotation_id: int | None = None  # its latest rotation
    status: MemberStatus = Field(default=MemberStatus.waiting, sa_type=AutoString(16))
    reason: str = Field(default="", max_length=EVENT_DETAIL_MAX)


# --------------------------------------------------------------------------- selection


def current_credentials(session: Session) -> dict[str, Credential]:
    """Each device's newest active credential (the one its key age and expiry are of)."""
    out: dict[str, Credential] = {}
    for cred in session.exec(select(Credential).where(
            col(Credential.status) == CredentialStatus.active).order_by(col(Credential.id))):
        out[cred.device_id] = cred  # later ids win: the newest
    return out


def credential_issuer(cred: Credential) -> str:
    """The id of the intermediate that issued ``cred`` (read from its certificate when
    the row has none recorded); "" when not known."""
    return cred.issuer or issuer_id_of_pem(cred.cert_pem) or ""


def device_facts(session: Session) -> list[tuple[DeviceFacts, Credential | None]]:
    """Every device (id order) with what a selector reads, and its current credential."""
    creds = current_credentials(session)
    tags: dict[str, set[str]] = {}
    for t in session.exec(select(DeviceTag)):
        tags.setdefault(t.device_id, set()).add(t.tag)
    out = []
    for d in session.exec(select(Device).order_by(col(Device.id))):
        cred = creds.get(d.id)
        out.append((DeviceFacts(
            id=d.id, site=d.site, model=d.model, hardware_class=d.hardware_class,
            firmware=d.firmware_version, state=str(d.state),
            tags=frozenset(tags.get(d.id, ())),
            key_issued_at=cred.not_before.timestamp() if cred else None,
            cert_expires_at=cred.not_after.timestamp() if cred else None,
            issuer=credential_issuer(cred) if cred else ""), cred))
    return out


@dataclass
class Preview:
    selector: str
    selected: list[str]
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> matching devices


def preview(session: Session, selector: policy.Selector, now: dt.datetime) -> Preview:
    """The devices ``selector`` would put in a campaign now (module docstring)."""
    out = Preview(selector.text(), [])
    t = now.timestamp()
    for facts, cred in device_facts(session):
        if not selector.matches(facts, t):
            continue
        if facts.state != DeviceState.active:
            why = "not active (%s)" % facts.state
        elif cred is None:
            why = "no active certificate"
        elif cred.not_after <= now:
            why = "certificate expired: needs a technician"
        else:
            out.selected.append(facts.id)
            continue
        out.left_out[why] = out.left_out.get(why, 0) + 1
    return out


def create(session: Session, *, selector_text: str, wave_size: int, max_failures: str,
           by: str, confirmed: bool, now: dt.datetime | None = None,
           lim: CampaignLimits = policy.LIMITS) -> tuple[RotationCampaign, Preview]:
    """A new running campaign (module docstring); the caller commits. CampaignError or
    SelectorError (422) for bad parameters, 409 for an empty selection or one that needs
    confirming."""
    now = now or utcnow()
    selector = policy.parse_selector(selector_text, lim)
    if not 0 < wave_size <= lim.wave_max:
        raise CampaignError(422, "wave: 1..%d devices" % lim.wave_max)
    seen = preview(session, selector, now)
    n = len(seen.selected)
    allowed = policy.parse_max_failures(max_failures, n)
    if n == 0:
        raise CampaignError(409, "the selector %s matches no device that can rotate" %
                            seen.selector)
    if n > lim.members_max:
        raise CampaignError(409, "the selector matches %d devices; a campaign takes at "
                            "most %d" % (n, lim.members_max))
    if n > lim.confirm_over and not confirmed:
        raise CampaignError(409, "the selector %s matches %d devices (over %d): look at "
                            "the preview (--dry-run) and confirm (--yes)"
                            % (seen.selector, n, lim.confirm_over))
    camp = RotationCampaign(selector=seen.selector, wave_size=wave_size,
                            max_failures=max_failures.strip(), allowed_failures=allowed,
                            members=n, created_by=by, created_at=now, updated_at=now)
    session.add(camp)
    session.flush()
    assert camp.id is not None
    session.add_all([CampaignMember(campaign_id=camp.id, device_id=d, position=i)
                     for i, d in enumerate(seen.selected)])
    audit.append(session, actor=by, action="campaign.create", outcome=audit.OK,
                 target="campaign:%d" % camp.id,
                 detail={"selector": camp.selector, "devices": n, "wave": wave_size,
                         "max_failures": camp.max_failures, "allowed_failures": allowed,
                         "left_out": seen.left_out})
    return camp, seen


# ------------------------------------------------------------------------------- rounds


def get(session: Session, campaign_id: int, *, lock: bool = False) -> RotationCampaign | None:
    query = select(RotationCampaign).where(col(RotationCampaign.id) == campaign_id)
    if lock:
        query = query.with_for_update()
    return session.exec(query).first()


def members_of(session: Session, campaign_id: int) -> list[CampaignMember]:
    return list(session.exec(select(CampaignMember).where(
        col(CampaignMember.campaign_id) == campaign_id).order_by(col(CampaignMember.position))))


def refresh(session: Session, camp: RotationCampaign, rows: list[CampaignMember],
            lim: CampaignLimits = policy.LIMITS, now: dt.datetime | None = None) -> None:
    """Each started member's status and reason from its latest rotation."""
    ids = [m.rotation_id for m in rows if m.rotation_id is not None]
    rots: dict[int, tuple[KeyRotation, int, int]] = {}
    for i in range(0, len(ids), 500):
        for rot, sends, tries in session.exec(
                select(KeyRotation, FleetCommand.sends, FleetCommand.attempts)
                .join(FleetCommand, col(FleetCommand.id) == KeyRotation.rotate_command_id,
                      isouter=True)
                .where(col(KeyRotation.id).in_(ids[i:i + 500]))).all():
            rots[rot.id or 0] = (rot, sends or 0, tries or 0)
    for m in rows:
        if m.rotation_id is None or m.rotation_id not in rots:
            continue
        rot, sends, tries = rots[m.rotation_id]
        status = policy.member_status(str(rot.state), rot.reason, sends > 0, m.attempts,
                                      lim.max_attempts, tries > 0)
        if status == M.retry and camp.state in policy.FINAL:
            status = M.failed  # nothing more will be tried
        reason = rot.reason if status in (M.failed, M.retry) else ""
        if status == M.retry and m.status != M.retry:
            m.next_try_at = (now or utcnow()) + dt.timedelta(
                seconds=policy.retry_wait_s(m.attempts, lim))
        if status != m.status or reason != m.reason:
            m.status = status
            m.reason = reason[:EVENT_DETAIL_MAX]
            session.add(m)


def _view(m: CampaignMember) -> Member:
    return Member(m.device_id, MemberStatus(m.status), m.wave,
                  m.next_try_at.timestamp() if m.next_try_at else None)


def advance(session: Session, campaign_id: int, *, signer: EcSigner, lim: FleetLimits,
            now: dt.datetime | None = None, clim: CampaignLimits = policy.LIMITS) -> Plan:
    """One round of a campaign (module docstring), in the caller's transaction."""
    now = now or utcnow()
    camp = get(session, campaign_id, lock=True)
    if camp is None:
        raise CampaignError(404, "no campaign %d" % campaign_id)
    rows = members_of(session, campaign_id)
    refresh(session, camp, rows, clim, now)
    plan = policy.decide(CampaignState(camp.state), camp.wave, camp.wave_size,
                         camp.allowed_failures, [_view(m) for m in rows], now.timestamp())
    by = "campaign:%d" % campaign_id
    if plan.state != camp.state:
        _set_state(session, camp, plan.state, by, plan.why, now, policy.counts(
            _view(m) for m in rows))
    if plan.wave != camp.wave:
        camp.wave = plan.wave
        camp.updated_at = now
        session.add(camp)
        audit.append(session, actor=by, action="campaign.wave", outcome=audit.OK,
                     target=by, detail={"wave": plan.wave, "devices": len(plan.start)})
    if plan.start:
        wanted = set(plan.start)
        for m in rows:
            if m.device_id in wanted:
                _start(session, camp, m, signer=signer, lim=lim, now=now, clim=clim)
    return plan


def _start(session: Session, camp: RotationCampaign, m: CampaignMember, *, signer: EcSigner,
           lim: FleetLimits, now: dt.datetime, clim: CampaignLimits) -> None:
    by = "campaign:%d" % (camp.id or 0)
    if m.wave is None:
        m.wave = camp.wave
    try:
        with session.begin_nested():
            rot = rotation.start_rotation(session, m.device_id, by=by, campaign_id=camp.id,
                                          signer=signer, lim=lim)
    except (rotation.RotationError, command_queue.CommandError, IntegrityError) as e:
        why = str(e) if not isinstance(e, IntegrityError) else "a concurrent change"
        if "open" in why and isinstance(e, rotation.RotationError):
            # another rotation of this device is under way (an operator's, a renewal):
            # try again later, without spending one of its tries
            m.status = M.retry
            m.next_try_at = now + dt.timedelta(seconds=clim.retry_base_s)
        else:
            m.status = M.failed
            m.attempts += 1
        m.reason = ("not started: %s" % why)[:EVENT_DETAIL_MAX]
        session.add(m)
        audit.append(session, actor=by, action="campaign.start_device",
                     outcome=audit.REFUSED, target=m.device_id, detail={"why": why})
        return
    m.attempts += 1
    m.rotation_id = rot.id
    m.status = M.active  # its rotate command is queued: the publisher sends it
    m.next_try_at = None
    m.reason = ""
    session.add(m)


def _set_state(session: Session, camp: RotationCampaign, state: CampaignState, by: str,
               why: str, now: dt.datetime, tally: dict[str, int] | None = None) -> None:
    was = camp.state
    camp.state = state
    camp.reason = why[:EVENT_DETAIL_MAX]
    camp.updated_at = now
    session.add(camp)
    audit.append(session, actor=by, action="campaign.%s" % state.value, outcome=audit.OK,
                 target="campaign:%d" % (camp.id or 0),
                 detail={"from": str(was), "why": why, **({"members": tally} if tally else {})})


def act(session: Session, campaign_id: int, action: str, *, by: str,
        now: dt.datetime | None = None) -> RotationCampaign:
    """pause, resume or abort (``campaign.transition``); the caller commits."""
    now = now or utcnow()
    camp = get(session, campaign_id, lock=True)
    if camp is None:
        raise CampaignError(404, "no campaign %d" % campaign_id)
    to = policy.transition(CampaignState(camp.state), action)
    _set_state(session, camp, to, by, "%s by %s" % (action, by), now)
    if to == CampaignState.aborted:
        _abort_undelivered(session, camp, by)
    return camp


def _abort_undelivered(session: Session, camp: RotationCampaign, by: str) -> None:
    for m in members_of(session, camp.id or 0):
        if m.rotation_id is None:
            continue
        rot = session.get(KeyRotation, m.rotation_id)
        if rot is None or str(rot.state) not in policy.ABORTABLE:
            continue
        cmd = command_queue.get_locked(session, rot.rotate_command_id or 0)
        if cmd is not None and cmd.sends == 0 and cmd.state in ("queued", "sent"):
            command_queue.cancel(session, cmd, by=by)
            rotation.on_answer(session, cmd, "cancelled", "campaign %d aborted" % (camp.id or 0),
                               actor=by)
        elif cmd is None:
            rotation.move(session, rot, rotation.FAIL, actor=by,
                          reason="campaign %d aborted" % (camp.id or 0))


def live_ids(session: Session) -> list[int]:
    """Campaigns the runner advances: running ones, and paused ones (their members'
    statuses kept current)."""
    return [c for c in session.exec(select(RotationCampaign.id).where(
        col(RotationCampaign.state).in_((CampaignState.running, CampaignState.paused)))
        .order_by(col(RotationCampaign.id))) if c is not None]


# ------------------------------------------------------------------------------ reading


def status(session: Session, campaign_id: int, *, devices: bool = False) -> dict[str, Any]:
    """The campaign's progress: counts by member status, waves, failures with reasons, and
    each rotation's state (what ``keys status`` prints, ``GET /campaigns/{id}``), read
    live from the rotations; the caller does not commit. ``devices``: also every member
    with its wave, status, tries, its rotation's id and state, and the reason."""
    camp = get(session, campaign_id)
    if camp is None:
        raise CampaignError(404, "no campaign %d" % campaign_id)
    rows = members_of(session, campaign_id)
    refresh(session, camp, rows)  # live, also between the runner's rounds (not committed)
    states: dict[str, int] = {}
    of_rotation: dict[int, str] = {}
    ids = [m.rotation_id for m in rows if m.rotation_id is not None]
    for i in range(0, len(ids), 500):
        for rid, st in session.exec(select(KeyRotation.id, KeyRotation.state).where(
                col(KeyRotation.id).in_(ids[i:i + 500]))):
            states[str(st)] = states.get(str(st), 0) + 1
            of_rotation[rid or 0] = str(st)
    tally = policy.counts(_view(m) for m in rows)
    out = {
        "id": camp.id, "selector": camp.selector, "state": str(camp.state),
        "reason": camp.reason, "wave": camp.wave, "wave_size": camp.wave_size,
        "waves": -(-camp.members // camp.wave_size), "members": camp.members,
        "max_failures": camp.max_failures, "allowed_failures": camp.allowed_failures,
        "created_by": camp.created_by, "created_at": camp.created_at.isoformat(),
        "updated_at": camp.updated_at.isoformat(),
        "counts": tally, "rotations": dict(sorted(states.items())),
        "failed": [{"device_id": m.device_id, "wave": m.wave, "attempts": m.attempts,
                    "reason": m.reason} for m in rows if m.status == M.failed],
        "offline": [m.device_id for m in rows if m.status in (M.offline, M.retry)],
    }
    if devices:
        out["devices"] = [
            {"device_id": m.device_id, "wave": m.wave, "status": str(m.status),
             "attempts": m.attempts, "rotation": m.rotation_id,
             "rotation_state": of_rotation.get(m.rotation_id or 0), "reason": m.reason}
            for m in rows]
    return out


def campaigns(session: Session, *, limit: int = 100) -> list[RotationCampaign]:
    return list(session.exec(select(RotationCampaign).order_by(
        col(RotationCampaign.id).desc()).limit(limit)))
