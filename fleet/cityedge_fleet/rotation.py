"""Device key rotation on the fleet: each device's rotation state, the one policy that moves
it, and the function API a campaign builds on (``start_rotation``, ``send_rotation``).

The protocol (messages, who checks what, power cuts on the device) has one home:
``cityedge_core.rotation``. This module keeps, per device, a ``KeyRotation`` row::

    pending -> sent -> csr-received -> issued -> proven -> old-revoked
       \\________\\___________\\___________\\_________\\------> failed (reason)
    failed -> proven     (only when a certificate was issued: a batch signed with the new
                          key is what the device did, whatever the fleet had given up on)

``RotationPolicy.next_state(state, event, issued)`` is the whole decision, I/O-free (table
tests and a hypothesis state machine hold it): events are ``SEND`` (the rotate command is
queued), ``CSR_TAKEN`` (a CSR passed ``rotation_ingest``'s checks), ``ISSUED``,
``NEW_KEY_SEEN`` (the ingest stored a batch signed with the new key), ``ERASED`` (the
device's ``ok`` to ``erase-key``), ``FAIL`` (a command of the rotation refused, failed,
expired or was cancelled; a CSR the device's own key vouched for was bad; the operator or a
revocation aborted it). An event the table does not list for a state changes nothing (a
late or repeated answer). ``old-revoked`` is final; ``failed`` is final but for
``NEW_KEY_SEEN`` after an issue.

Rules of the API:

- ``start_rotation``: the device exists (404), is active (409), has an active credential
  (409: the one to replace, the newest), and has no open rotation (409: one at a time);
  the row is ``pending``; with a ``signer`` its ``rotate`` command is queued at once
  (``send_rotation``: ``sent``);
- a failure never revokes anything: a device whose answer was lost may already use the new
  certificate, and revoking it would lock the device out; an issued but unproven
  certificate stays active and shows in the rotation (``new_serial``);
- every transition is audited (``rotation.<state>``), by whoever caused it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, col, select

from cityedge_core import rotation as corerot
from cityedge_fleet import audit, command_queue
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import (
    EVENT_DETAIL_MAX,
    OPEN_ROTATIONS,
    Credential,
    CredentialStatus,
    Device,
    DeviceState,
    FleetCommand,
    KeyRotation,
    KeyRotationPublic,
    RotationState,
    utcnow,
)
from cityedge_host.crypto import EcSigner

S = RotationState
SEND = "send"
CSR_TAKEN = "csr-taken"
ISSUED = "issued"
NEW_KEY_SEEN = "new-key-seen"
ERASED = "erased"
FAIL = "fail"
EVENTS = (SEND, CSR_TAKEN, ISSUED, NEW_KEY_SEEN, ERASED, FAIL)
ROTATION_COMMANDS = (corerot.ROTATE, corerot.INSTALL_CERT, corerot.ERASE_KEY)


class RotationPolicy:
    """The state table (module docstring). I/O-free."""

    TABLE: dict[tuple[RotationState, str], RotationState] = {
        (S.pending, SEND): S.sent,
        (S.sent, CSR_TAKEN): S.csr_received,
        (S.csr_received, ISSUED): S.issued,
        (S.issued, NEW_KEY_SEEN): S.proven,
        (S.proven, ERASED): S.old_revoked,
        **{(s, FAIL): S.failed for s in OPEN_ROTATIONS},
    }

    @classmethod
    def next_state(cls, state: RotationState, event: str, issued: bool = False
                   ) -> RotationState | None:
        """The state ``event`` moves a rotation in ``state`` to; None: no change.
        ``issued``: a certificate was issued in this rotation (its ``new_kid`` is set)."""
        if event not in EVENTS:
            raise ValueError("no rotation event %r" % event)
        state = RotationState(state)
        if state == S.failed and event == NEW_KEY_SEEN and issued:
            return S.proven
        return cls.TABLE.get((state, event))


class RotationError(ValueError):
    """A rotation refused: ``status`` for the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def move(session: Session, rot: KeyRotation, event: str, *, actor: str,
         audits: list[dict[str, Any]] | None = None, reason: str = "",
         detail: dict[str, Any] | None = None) -> bool:
    """Apply ``event`` to ``rot``; audits the transition (into ``audits`` when given, to be
    appended by the caller after its other row locks; else now). False: no change."""
    to = RotationPolicy.next_state(RotationState(rot.state), event, rot.new_kid is not None)
    if to is None:
        return False
    was = RotationState(rot.state)
    rot.state = to
    rot.updated_at = utcnow()
    if to == S.failed:
        rot.reason = command_queue.bounded_detail(reason)[:EVENT_DETAIL_MAX]
    session.add(rot)
    row: dict[str, Any] = {
        "actor": actor, "action": "rotation.%s" % to.value, "outcome": audit.OK,
        "target": rot.device_id,
        "detail": {"rotation": rot.id, "from": was.value, **(detail or {}),
                   **({"reason": rot.reason} if to == S.failed else {})}}
    if audits is None:
        audit.append(session, **row)
    else:
        audits.append(row)
    return True


def open_rotation(session: Session, device_id: str, *, lock: bool = False
                  ) -> KeyRotation | None:
    query = select(KeyRotation).where(col(KeyRotation.device_id) == device_id,
                                      col(KeyRotation.state).in_(OPEN_ROTATIONS))
    if lock:
        query = query.with_for_update()
    return session.exec(query.order_by(col(KeyRotation.id).desc())).first()


def start_rotation(session: Session, device_id: str, *, by: str, campaign_id: int | None = None,
                   signer: EcSigner | None = None, lim: FleetLimits | None = None
                   ) -> KeyRotation:
    """A new rotation of ``device_id`` (rules in the module docstring), in the caller's
    transaction; ``signer`` and ``lim`` given: its rotate command is queued too. The caller
    commits (and wakes the publisher)."""
    device = session.exec(select(Device).where(col(Device.id) == device_id)
                          .with_for_update()).first()  # one open rotation: the lock decides
    if device is None:
        raise RotationError(404, "no device %s" % device_id)
    if device.state != DeviceState.active:
        raise RotationError(409, "device %s is %s: only an active device is rotated"
                            % (device_id, device.state))
    current = session.exec(select(Credential).where(
        col(Credential.device_id) == device_id,
        col(Credential.status) == CredentialStatus.active)
        .order_by(col(Credential.id).desc())).first()
    if current is None:
        raise RotationError(409, "device %s has no active certificate to replace" % device_id)
    existing = open_rotation(session, device_id)
    if existing is not None:
        raise RotationError(409, "device %s has rotation %d open (%s): one at a time"
                            % (device_id, existing.id or 0, existing.state))
    rot = KeyRotation(device_id=device_id, campaign_id=campaign_id, old_kid=current.kid,
                      created_by=by)
    session.add(rot)
    session.flush()
    audit.append(session, actor=by, action="rotation.pending", outcome=audit.OK,
                 target=device_id, detail={"rotation": rot.id, "old_kid": rot.old_kid,
                                           "campaign": campaign_id})
    if signer is not None:
        send_rotation(session, rot, signer=signer, lim=lim or FleetLimits(), by=by)
    return rot


def send_rotation(session: Session, rot: KeyRotation, *, signer: EcSigner, lim: FleetLimits,
                  by: str) -> FleetCommand:
    """Queue the signed ``rotate`` command of a ``pending`` rotation (it becomes ``sent``)."""
    if rot.state != S.pending:
        raise RotationError(409, "rotation %d is %s, not pending" % (rot.id or 0, rot.state))
    cmd = command_queue.queue(session, signer=signer, device_id=rot.device_id,
                              name=corerot.ROTATE, args={"rotation": rot.id},
                              wire_args={corerot.A_ROTATION: rot.id}, expires_in_s=None,
                              created_by=by, lim=lim)
    rot.rotate_command_id = cmd.id
    move(session, rot, SEND, actor=by, detail={"command": cmd.id, "seq": cmd.seq})
    return cmd


def abort(session: Session, device_id: str, *, by: str, reason: str,
          audits: list[dict[str, Any]] | None = None) -> KeyRotation | None:
    """Fail the device's open rotation, if any (a revocation, the operator)."""
    rot = open_rotation(session, device_id, lock=True)
    if rot is not None:
        move(session, rot, FAIL, actor=by, audits=audits, reason=reason)
    return rot


def for_command(session: Session, cmd: FleetCommand) -> KeyRotation | None:
    """The rotation ``cmd`` belongs to (a rotate, install-cert or erase-key command)."""
    if cmd.name not in ROTATION_COMMANDS or cmd.id is None:
        return None
    field = {corerot.ROTATE: KeyRotation.rotate_command_id,
             corerot.INSTALL_CERT: KeyRotation.install_command_id,
             corerot.ERASE_KEY: KeyRotation.erase_command_id}[cmd.name]
    return session.exec(select(KeyRotation).where(col(field) == cmd.id)
                        .with_for_update()).first()


def on_answer(session: Session, cmd: FleetCommand, outcome: str, detail: str, *, actor: str,
              audits: list[dict[str, Any]] | None = None) -> KeyRotation | None:
    """A rotation command answered (``outcome``: the device's ``ok``/``refused``/``failed``)
    or given up on by the fleet (``expired``/``cancelled``): what it does to its rotation."""
    rot = for_command(session, cmd)
    if rot is None:
        return None
    if outcome == "ok":
        if cmd.name == corerot.ERASE_KEY:
            move(session, rot, ERASED, actor=actor, audits=audits,
                 detail={"command": cmd.id, "old_kid": rot.old_kid})
        return rot
    # what the rotation waits for at this step failed; a late answer to a step already
    # passed (a re-sent rotate refused as a replay after the CSR came) changes nothing
    waits = {corerot.ROTATE: (S.sent,), corerot.INSTALL_CERT: (S.issued,),
             corerot.ERASE_KEY: (S.proven,)}[cmd.name]
    if rot.state in waits:
        move(session, rot, FAIL, actor=actor, audits=audits,
             reason="%s %s: %s" % (cmd.name, outcome, detail), detail={"command": cmd.id})
    return rot


def expire_commands(session: Session, now: dt.datetime) -> list[FleetCommand]:
    """``command_queue.expire_due``, and a rotation whose awaited command expired fails
    (the publisher's round calls this; it audits each expired command)."""
    expired = command_queue.expire_due(session, now)
    for cmd in expired:
        on_answer(session, cmd, "expired", "the fleet gave up after %d sends" % cmd.sends,
                  actor="fleet")
    return expired


def of_device(session: Session, device_id: str, *, limit: int) -> Sequence[KeyRotation]:
    return session.exec(select(KeyRotation).where(col(KeyRotation.device_id) == device_id)
                        .order_by(col(KeyRotation.id).desc()).limit(limit)).all()


def to_public(rot: KeyRotation) -> KeyRotationPublic:
    return KeyRotationPublic.model_validate(rot)


def age(rot: KeyRotation, now: dt.datetime | None = None) -> float:
    """Seconds since the rotation last moved."""
    return ((now or utcnow()) - rot.updated_at).total_seconds()
