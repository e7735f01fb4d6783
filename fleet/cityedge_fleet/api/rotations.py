"""Key rotation and emergency revocation over HTTP: the security team (and admins) rotate a
device's key (``rotation``: the protocol in ``cityedge_core.rotation``) and cut a device
off (``revoke``); readers see a device's rotations. Every change is audited, a refusal
too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy.exc import IntegrityError

from cityedge_fleet import audit, revoke, rotation
from cityedge_fleet.api.commands import PAGE_MAX, _wake_publisher
from cityedge_fleet.api.deps import (
    BrokerDep,
    CaDep,
    CommandKeyDep,
    ReaderDep,
    SecurityDep,
    SettingsDep,
)
from cityedge_fleet.auth import client_address
from cityedge_fleet.command_queue import CommandError
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import Device, KeyRotationPublic, RevokePublic, RevokeRequest

router = APIRouter(tags=["keys"])


@router.post("/devices/{device_id}/rotate", response_model=KeyRotationPublic,
             status_code=201, responses={404: {}, 409: {}})
def rotate_device(device_id: str, request: Request, session: SessionDep,
                  settings: SettingsDep, signer: CommandKeyDep,
                  who: SecurityDep) -> KeyRotationPublic:
    """Start rotating the device's key: a signed ``rotate`` command is queued; the device
    answers with a CSR proven by its current key, gets its new certificate, and the old one
    is revoked once a batch signed with the new key is stored (``GET .../rotations``)."""
    try:
        rot = rotation.start_rotation(session, device_id, by=who.name, signer=signer,
                                      lim=settings.limits)
        session.commit()
    except (rotation.RotationError, CommandError, IntegrityError) as e:
        session.rollback()
        status = getattr(e, "status", 409)
        why = str(e) if not isinstance(e, IntegrityError) else \
            "another change to %s at the same moment; try again" % device_id
        audit.record(session, actor=who.name, action="rotation.start",
                     outcome=audit.REFUSED, target=device_id, source=client_address(request),
                     detail={"why": why})
        raise HTTPException(status, why) from e
    _wake_publisher(request)
    return rotation.to_public(rot)


@router.get("/devices/{device_id}/rotations", response_model=list[KeyRotationPublic],
            responses={404: {}})
def list_rotations(device_id: str, session: SessionDep, settings: SettingsDep,
                   who: ReaderDep,
                   limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX)] = None
                   ) -> Sequence[KeyRotationPublic]:
    """The device's key rotations, newest first, with their state and reason."""
    if session.get(Device, device_id) is None:
        raise HTTPException(404, "no device %s" % device_id)
    page = min(limit or settings.limits.page_default, settings.limits.page_max)
    return [rotation.to_public(r) for r in rotation.of_device(session, device_id, limit=page)]


@router.post("/devices/{device_id}/revoke", response_model=RevokePublic,
             responses={404: {}, 409: {}})
def revoke_device(device_id: str, body: RevokeRequest, request: Request,
                  session: SessionDep, settings: SettingsDep, ca: CaDep, broker: BrokerDep,
                  who: SecurityDep) -> RevokePublic:
    """Emergency revocation: every certificate of the device revoked, the CRL re-signed and
    the broker reloaded, the device cut and kicked at the broker and quarantined; the
    ingest refuses its batches from now on."""
    try:
        return revoke.revoke_device(session, device_id=device_id, reason=body.reason,
                                    note=body.note, by=who.name,
                                    source=client_address(request), ca=ca,
                                    settings=settings, broker=broker)
    except revoke.RevokeError as e:
        session.rollback()
        audit.record(session, actor=who.name, action="device.revoke", outcome=audit.REFUSED,
                     target=device_id, source=client_address(request),
                     detail={"why": str(e)})
        raise HTTPException(e.status, str(e)) from e
