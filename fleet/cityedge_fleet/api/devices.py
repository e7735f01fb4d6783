"""The registry over HTTP: register, list and filter, update, change lifecycle state,
see and revoke credentials, read verified readings and ingest events.

A technician token scoped to sites registers devices only at those sites, and changes only
devices there without moving them elsewhere (``auth.require_sites``). The OpenAPI links
say which answer feeds which request (a registered device's id to its other operations).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from sqlmodel import Session, col, select

from cityedge_core import batch as batchmod
from cityedge_fleet import audit, registry, revocation
from cityedge_fleet.api.deps import (
    BrokerDep,
    CaDep,
    ReaderDep,
    SecurityDep,
    SettingsDep,
    TechnicianDep,
)
from cityedge_fleet.auth import client_address, require_sites
from cityedge_fleet.broker_sync import desired_devices
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import (
    Credential,
    CredentialPublic,
    CredentialStatus,
    Device,
    DeviceCreate,
    DevicePublic,
    DevicesPublic,
    DeviceState,
    DeviceUpdate,
    IngestEvent,
    IngestEventPublic,
    Reading,
    ReadingPublic,
    StateChange,
)

router = APIRouter(prefix="/devices", tags=["devices"])
PAGE_MAX = 500  # rows: FleetLimits.page_max (a Query bound must be a constant)


def _device_links(source: str) -> dict[str, Any]:
    """OpenAPI links from an answer naming a device (``source``: where its id is) to the
    operations on that device."""
    ops = {"GetDevice": ("", "get"), "UpdateDevice": ("", "patch"),
           "ChangeState": ("~1state", "post"), "ListCredentials": ("~1credentials", "get"),
           "ListReadings": ("~1readings", "get"), "ListEvents": ("~1events", "get")}
    return {name: {"operationRef": "#/paths/~1devices~1{device_id}%s/%s" % (tail, method),
                   "parameters": {"device_id": source}}
            for name, (tail, method) in ops.items()}


REGISTERED_LINKS = {
    **_device_links("$response.body#/id"),
    "IssueEnrollmentToken": {"operationRef": "#/paths/~1enrollment~1tokens/post",
                             "requestBody": {"serial": "$response.body#/serial"}},
}
CREDENTIAL_LINKS = {"RevokeCredential": {
    "operationRef": "#/paths/~1devices~1{device_id}~1credentials~1{serial}~1revoke/post",
    "parameters": {"device_id": "$request.path.device_id", "serial": "$response.body#/0/serial"}}}
SCOPE_REFUSAL = ("a technician token scoped to sites registers and changes devices only "
                 "at those sites, and does not move them elsewhere")


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise HTTPException(404, "no device %s" % device_id)
    return device


@router.post("", response_model=DevicePublic, status_code=201,
             responses={201: {"links": REGISTERED_LINKS}})
def register_device(body: DeviceCreate, request: Request, session: SessionDep,
                    who: TechnicianDep) -> DevicePublic:
    require_sites(request, session, who, [body.site], action="device.register",
                  target=body.id, refusal=SCOPE_REFUSAL)
    try:
        device = registry.create_device(session, data=body)
    except registry.ConflictError as e:
        raise HTTPException(409, str(e)) from e
    audit.append(session, actor=who.name, action="device.register", outcome=audit.OK,
                 target=body.id, source=client_address(request),
                 detail={"serial": body.serial, **who.scope_detail()})
    session.commit()
    return registry.to_public(session, [device])[0]


@router.get("", response_model=DevicesPublic,
            responses={200: {"links": _device_links("$response.body#/data/0/id")}})
def list_devices(
    session: SessionDep,
    settings: SettingsDep,
    who: ReaderDep,
    after: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX)] = None,
    state: DeviceState | None = None,
    hardware_class: Annotated[str | None, Query(max_length=128)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    site: Annotated[str | None, Query(max_length=128)] = None,
    firmware_version: Annotated[str | None, Query(max_length=128)] = None,
    tag: Annotated[str | None, Query(max_length=128)] = None,
) -> DevicesPublic:
    page = min(limit or settings.limits.page_default, settings.limits.page_max)
    rows, next_after = registry.list_devices(
        session, limit=page, after=after, state=state, hardware_class=hardware_class,
        model=model, site=site, firmware_version=firmware_version, tag=tag)
    return DevicesPublic(data=registry.to_public(session, rows), next_after=next_after)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, who: ReaderDep) -> DevicePublic:
    return registry.to_public(session, [_device(session, device_id)])[0]


@router.patch("/{device_id}", response_model=DevicePublic)
def update_device(device_id: str, body: DeviceUpdate, request: Request, session: SessionDep,
                  who: TechnicianDep) -> DevicePublic:
    device = _device(session, device_id)
    require_sites(request, session, who, [device.site, *([body.site] if body.site is not None
                                                        else [])],
                  action="device.update", target=device_id, refusal=SCOPE_REFUSAL)
    try:
        device = registry.update_device(session, device=device, data=body)
    except registry.ConflictError as e:  # a gateway that is not registered, or itself
        raise HTTPException(409, str(e)) from e
    audit.append(session, actor=who.name, action="device.update", outcome=audit.OK,
                 target=device_id, source=client_address(request),
                 detail={**body.model_dump(exclude_unset=True), **who.scope_detail()})
    session.commit()
    return registry.to_public(session, [device])[0]


@router.post("/{device_id}/state", response_model=DevicePublic)
def change_state(device_id: str, body: StateChange, request: Request, session: SessionDep,
                 settings: SettingsDep, ca: CaDep, broker: BrokerDep,
                 who: SecurityDep) -> DevicePublic:
    """Move a device through its lifecycle. Quarantine suspends its certificates and
    retirement revokes them (both published on the CRL at once); either closes the
    device's live broker session and takes its broker grant away. Reactivating a
    quarantined device restores them."""
    device = _device(session, device_id)
    try:
        old = registry.set_state(session, device=device, state=body.state)
    except registry.TransitionError as e:
        session.rollback()
        audit.record(session, actor=who.name, action="device.state", outcome=audit.REFUSED,
                     target=device_id, source=client_address(request),
                     detail={"to": body.state.value, "why": str(e)})
        raise HTTPException(409, str(e)) from e
    audit.append(session, actor=who.name, action="device.state", outcome=audit.OK,
                 target=device_id, source=client_address(request),
                 detail={"from": old.value, "to": body.state.value, "reason": body.reason})
    session.commit()
    if body.state in (DeviceState.quarantined, DeviceState.retired) or (
            old == DeviceState.quarantined):
        revocation.publish_crl(session, ca, settings)
    broker.follow(device_id, accepting=device_id in desired_devices(session))
    return registry.to_public(session, [device])[0]


@router.get("/{device_id}/credentials", response_model=list[CredentialPublic],
            responses={200: {"links": CREDENTIAL_LINKS}})
def list_credentials(device_id: str, session: SessionDep, who: ReaderDep
                     ) -> Sequence[Credential]:
    _device(session, device_id)
    return registry.credentials_of(session, device_id)


@router.post("/{device_id}/credentials/{serial}/revoke", response_model=CredentialPublic)
def revoke_credential(device_id: str, serial: str, request: Request, session: SessionDep,
                      settings: SettingsDep, ca: CaDep, broker: BrokerDep,
                      who: SecurityDep) -> Credential:
    cred = session.exec(select(Credential).where(
        Credential.device_id == device_id, Credential.serial == serial.lower())).first()
    if cred is None:
        raise HTTPException(404, "device %s has no certificate %s" % (device_id, serial))
    if cred.status != CredentialStatus.revoked:
        registry.revoke_credential(session, credential=cred)
    audit.append(session, actor=who.name, action="credential.revoke", outcome=audit.OK,
                 target=device_id, source=client_address(request), detail={"serial": serial})
    session.commit()
    revocation.publish_crl(session, ca, settings)  # the broker refuses it from now on,
    if device_id in desired_devices(session):  # and its live session is closed:
        broker.kick_or_log(device_id)  # the device reconnects with its other certificate
    else:
        broker.follow(device_id, accepting=False)  # or may not connect at all
    session.refresh(cred)
    return cred


@router.get("/{device_id}/readings", response_model=list[ReadingPublic])
def list_readings(
    device_id: str,
    session: SessionDep,
    settings: SettingsDep,
    who: ReaderDep,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX)] = None,
) -> Sequence[Reading]:
    """Verified readings, oldest first; with ``since``/``until`` only those in
    ``since <= t < until`` that carry UNIX time (not seconds since boot)."""
    _device(session, device_id)
    query = select(Reading).where(Reading.device_id == device_id)
    if since is not None or until is not None:
        query = query.where(Reading.timebase == batchmod.TIME_UNIX)
    if since is not None:
        query = query.where(col(Reading.t) >= _epoch(since))
    if until is not None:
        query = query.where(col(Reading.t) < _epoch(until))
    page = min(limit or settings.limits.page_default, settings.limits.page_max)
    return session.exec(query.order_by(col(Reading.t), col(Reading.id)).limit(page)).all()


def _epoch(when: dt.datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@router.get("/{device_id}/events", response_model=list[IngestEventPublic])
def list_events(device_id: str, session: SessionDep, who: ReaderDep,
                limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100
                ) -> Sequence[IngestEvent]:
    """What the ingest noticed: gaps, drops, duplicates, replays, forgeries (newest first)."""
    return session.exec(select(IngestEvent).where(IngestEvent.device_id == device_id)
                        .order_by(col(IngestEvent.id).desc()).limit(limit)).all()
