"""The device registry: devices, their tags and lifecycle, and their credentials.

Lifecycle (``TRANSITIONS`` is the whole rule; anything else is refused with
``TransitionError``)::

    registered -> provisioned -> active <-> quarantined
         \\             \\            \\          \\
          `-------------`------------`----------`--> retired (final)

Enrollment moves registered -> provisioned, the first accepted batch provisioned ->
active, repeated forgeries or malformed batches -> quarantined, the security team
quarantined -> active (which clears both counters). A node's ``gateway_id`` names the
registered device, other than itself, whose relay topic may carry its batches.

A state change carries its device's credentials along (``set_state``): quarantine
suspends the active ones (they go on the CRL as ``certificateHold`` and the ingest stops
trusting their keys), reactivation lifts the suspension, retirement revokes them for good.
The broker follows (``broker_sync``).
Lists use keyset pagination on the device id (``after`` = last id of the previous page),
so a page costs the same at device 100,000 as at device 1.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import text as sa_text
from sqlmodel import Session, col, select

from cityedge_fleet.models import (
    ChainPublic,
    ChainStateRow,
    Credential,
    CredentialStatus,
    Device,
    DeviceCreate,
    DevicePublic,
    DeviceState,
    DeviceTag,
    DeviceUpdate,
)

S = DeviceState
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    S.registered: frozenset({S.provisioned, S.retired}),
    S.provisioned: frozenset({S.active, S.quarantined, S.retired}),
    S.active: frozenset({S.quarantined, S.retired}),
    S.quarantined: frozenset({S.active, S.retired}),
    S.retired: frozenset(),
}


class TransitionError(ValueError):
    """A lifecycle change that the rules do not allow."""


class ConflictError(ValueError):
    """The request conflicts with what is registered (duplicate id or serial)."""


def check_transition(current: DeviceState, new: DeviceState) -> None:
    if new not in TRANSITIONS[DeviceState(current)]:
        raise TransitionError("a %s device cannot become %s" % (current, new))


def set_state(session: Session, *, device: Device, state: DeviceState) -> DeviceState:
    """Move ``device`` to ``state`` (in the session; the caller commits); returns the old.

    Credentials follow: quarantined suspends the active ones, quarantined -> active
    restores the suspended ones, retired revokes every one not yet revoked.
    """
    old = DeviceState(device.state)
    check_transition(old, state)
    device.state = state
    if state == S.active:
        device.forgeries = 0
        device.malformed = 0
    session.add(device)
    now = dt.datetime.now(dt.UTC)
    C = CredentialStatus
    if state == S.quarantined:
        _move_credentials(session, device.id, (C.active,), C.suspended, now)
    elif state == S.retired:
        _move_credentials(session, device.id, (C.active, C.suspended), C.revoked, now)
    elif state == S.active and old == S.quarantined:
        _move_credentials(session, device.id, (C.suspended,), C.active, None)
    return old


def _move_credentials(session: Session, device_id: str, froms: tuple[CredentialStatus, ...],
                      to: CredentialStatus, at: dt.datetime | None) -> None:
    for cred in session.exec(select(Credential).where(
            Credential.device_id == device_id, col(Credential.status).in_(froms))):
        cred.status = to
        cred.revoked_at = at
        session.add(cred)


def create_device(session: Session, *, data: DeviceCreate) -> Device:
    if session.get(Device, data.id) is not None:
        raise ConflictError("device %s is already registered" % data.id)
    if session.exec(select(Device).where(Device.serial == data.serial)).first() is not None:
        raise ConflictError("serial %s is already registered" % data.serial)
    _check_gateway(session, data.id, data.gateway_id)
    device = Device.model_validate(data, update={"state": S.registered})
    session.add(device)
    session.flush()
    for tag in data.tags:
        session.add(DeviceTag(device_id=data.id, tag=tag))
    session.flush()
    return device


def _check_gateway(session: Session, device_id: str, gateway_id: str | None) -> None:
    if gateway_id is None:
        return
    if gateway_id == device_id:
        raise ConflictError("device %s cannot be its own gateway" % device_id)
    if session.get(Device, gateway_id) is None:
        raise ConflictError("gateway %s is not registered" % gateway_id)


def update_device(session: Session, *, device: Device, data: DeviceUpdate) -> Device:
    changes = data.model_dump(exclude_unset=True)
    tags = changes.pop("tags", None)
    if "gateway_id" in changes:
        _check_gateway(session, device.id, changes["gateway_id"])
    device.sqlmodel_update(changes)
    session.add(device)
    if tags is not None:
        for old in session.exec(select(DeviceTag).where(DeviceTag.device_id == device.id)):
            session.delete(old)
        session.flush()
        for tag in tags:
            session.add(DeviceTag(device_id=device.id, tag=tag))
    session.flush()
    return device


def get_by_serial(session: Session, serial: str) -> Device | None:
    return session.exec(select(Device).where(Device.serial == serial)).first()


def list_devices(
    session: Session,
    *,
    limit: int,
    after: str | None = None,
    state: DeviceState | None = None,
    hardware_class: str | None = None,
    model: str | None = None,
    site: str | None = None,
    firmware_version: str | None = None,
    tag: str | None = None,
    search: str | None = None,
) -> tuple[Sequence[Device], str | None]:
    """One page of devices ordered by id, and the ``after`` cursor of the next page.
    ``search`` (the console's search box): the device whose serial it is, then those whose
    id starts with it (``search_ids``); both read an index."""
    if search is not None:
        return search_ids(session, search, limit=limit, after=after, state=state,
                          site=site, model=model)
    query = select(Device)
    if after is not None:
        query = query.where(col(Device.id) > after)
    if state is not None:
        query = query.where(Device.state == state)
    if hardware_class is not None:
        query = query.where(Device.hardware_class == hardware_class)
    if model is not None:
        query = query.where(Device.model == model)
    if site is not None:
        query = query.where(Device.site == site)
    if firmware_version is not None:
        query = query.where(Device.firmware_version == firmware_version)
    if tag is not None:
        tagged = select(DeviceTag.device_id).where(DeviceTag.tag == tag)
        query = query.where(col(Device.id).in_(tagged))
    rows = session.exec(query.order_by(col(Device.id)).limit(limit + 1)).all()
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


def to_public(session: Session, devices: Sequence[Device]) -> list[DevicePublic]:
    """Public views with tags and chain summary, in two queries for the whole page."""
    ids = [d.id for d in devices]
    tags: dict[str, list[str]] = {i: [] for i in ids}
    chains: dict[str, ChainPublic] = {}
    if ids:
        for t in session.exec(select(DeviceTag).where(col(DeviceTag.device_id).in_(ids))
                              .order_by(col(DeviceTag.tag))):
            tags[t.device_id].append(t.tag)
        for c in session.exec(select(ChainStateRow).where(
                col(ChainStateRow.device_id).in_(ids))):
            chains[c.device_id] = ChainPublic(last_seq=c.last_seq, missing=c.missing,
                                              forgotten=c.forgotten)
    return [
        DevicePublic.model_validate(d, update={"tags": tags[d.id], "chain": chains.get(d.id)})
        for d in devices
    ]


def add_credential(session: Session, *, credential: Credential) -> Credential:
    session.add(credential)
    session.flush()
    return credential


def revoke_credential(session: Session, *, credential: Credential,
                      at: dt.datetime | None = None) -> None:
    credential.status = CredentialStatus.revoked
    credential.revoked_at = at or dt.datetime.now(dt.UTC)
    session.add(credential)
    session.flush()


def credentials_of(session: Session, device_id: str) -> Sequence[Credential]:
    return session.exec(select(Credential).where(Credential.device_id == device_id)
                        .order_by(col(Credential.id))).all()


def revoked_credentials(session: Session) -> Sequence[Credential]:
    """Credentials the CRL lists: revoked, and suspended (on hold)."""
    return session.exec(select(Credential).where(col(Credential.status).in_(
        (CredentialStatus.revoked, CredentialStatus.suspended)))).all()


def search_ids(session: Session, text: str, *, limit: int, after: str | None = None,
               state: DeviceState | None = None, site: str | None = None,
               model: str | None = None) -> tuple[Sequence[Device], str | None]:
    """One page of the devices whose id starts with ``text`` (read from the primary key:
    ``id >= text``, stopped at the page's end or, for an id prefix, where the ids of that
    prefix end), with first, on the first page, the device whose serial is ``text`` (its
    unique index). Two plain index reads: an ``OR`` of both would scan the table."""
    rows: list[Device] = []
    if after is None:
        by_serial = session.exec(select(Device).where(Device.serial == text)).first()
        if by_serial is not None and _matches(by_serial, state, site, model):
            rows.append(by_serial)
    if text.startswith("urn:"):  # a device id is a URN (RFC 9039): nothing else can match
        start = max(text, after) if after is not None else text
        query = select(Device).where(col(Device.id) >= start,
                                     col(Device.id).startswith(text, autoescape=True))
        if after is not None:
            query = query.where(col(Device.id) > after)
        if _sorts_bytewise(session):  # the prefix's ids end before text + DEL
            query = query.where(col(Device.id) < text + "\x7f")
        if state is not None:
            query = query.where(Device.state == state)
        if site is not None:
            query = query.where(Device.site == site)
        if model is not None:
            query = query.where(Device.model == model)
        rows += [d for d in session.exec(query.order_by(col(Device.id)).limit(limit + 1))
                 if d not in rows]
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


BYTEWISE_COLLATIONS = frozenset({"C", "POSIX", "C.UTF-8", "C.utf8", "ucs_basic"})
_bytewise: dict[str, bool] = {}  # database URL: does its text sort bytewise


def _sorts_bytewise(session: Session) -> bool:
    """SQLite's BINARY collation and PostgreSQL's C collations order ids byte by byte, so
    an id prefix is one bounded range of the primary key; a linguistic collation (it may
    ignore punctuation or DEL) gets the lower bound only."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        return True
    key = str(bind.engine.url if hasattr(bind, "engine") else bind)
    if key not in _bytewise:
        collation = session.execute(sa_text(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()")).scalar()
        _bytewise[key] = collation in BYTEWISE_COLLATIONS
    return _bytewise[key]


def _matches(device: Device, state: DeviceState | None, site: str | None,
             model: str | None) -> bool:
    return ((state is None or device.state == state) and (site is None or device.site == site)
            and (model is None or device.model == model))
