"""Fleet commands over HTTP: the security team (and admins) queue a signed command for a
device and cancel one; readers see a device's commands and each command's delivery and
answer. The rules are ``command_queue``'s; every change is audited, a refusal too.
``fleet serve``'s publisher (``command_publisher``) delivers what is queued."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from cityedge_fleet import audit, command_queue, rotation
from cityedge_fleet.api.deps import CommandKeyDep, ReaderDep, SecurityDep, SettingsDep
from cityedge_fleet.auth import client_address
from cityedge_fleet.command_queue import CommandError
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import (
    ID_MAX,
    CommandCreate,
    CommandPublic,
    CommandState,
    Device,
    FleetCommand,
)

router = APIRouter(tags=["commands"])
PAGE_MAX = 500  # rows: FleetLimits.page_max (a Query bound must be a constant)
COMMAND_LINKS = {
    "GetCommand": {"operationRef": "#/paths/~1commands~1{command_id}/get",
                   "parameters": {"command_id": "$response.body#/id"}},
    "CancelCommand": {"operationRef": "#/paths/~1commands~1{command_id}~1cancel/post",
                      "parameters": {"command_id": "$response.body#/id"}},
}
CommandId = Annotated[int, Path(ge=1, le=ID_MAX)]


def _wake_publisher(request: Request) -> None:
    publisher = getattr(request.app.state, "command_publisher", None)
    if publisher is not None:
        publisher.wake()


@router.post("/devices/{device_id}/commands", response_model=CommandPublic, status_code=201,
             responses={201: {"links": COMMAND_LINKS}, 404: {}, 409: {}, 422: {}})
def send_command(device_id: str, body: CommandCreate, request: Request, session: SessionDep,
                 settings: SettingsDep, signer: CommandKeyDep,
                 who: SecurityDep) -> CommandPublic:
    """Queue a command for the device: numbered (the next of the device's sequence),
    signed with the fleet's command key, and delivered by ``fleet serve`` over MQTT until
    the device answers or it expires."""
    try:
        cmd = command_queue.queue(session, signer=signer, device_id=device_id,
                                  name=body.name, args=body.args,
                                  expires_in_s=body.expires_in_s, created_by=who.name,
                                  lim=settings.limits)
        session.flush()
    except (CommandError, IntegrityError) as e:
        session.rollback()
        if isinstance(e, IntegrityError):  # another replica numbered one at the same moment
            e = CommandError(409, "another command for %s was queued at the same moment; "
                             "send it again" % device_id)
        audit.record(session, actor=who.name, action="command.create",
                     outcome=audit.REFUSED, target=device_id, source=client_address(request),
                     detail={"name": body.name, "why": str(e)})
        raise HTTPException(e.status, str(e)) from e
    audit.append(session, actor=who.name, action="command.create", outcome=audit.OK,
                 target=device_id, source=client_address(request),
                 detail={"command": cmd.id, "seq": cmd.seq, "name": cmd.name,
                         "expires_at": cmd.expires_at.isoformat(), "kid": cmd.kid})
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise HTTPException(409, "another command for %s was queued at the same moment; "
                            "send it again" % device_id) from e
    _wake_publisher(request)
    return command_queue.to_public(cmd)


@router.get("/devices/{device_id}/commands", response_model=list[CommandPublic],
            responses={404: {}})
def list_commands(device_id: str, session: SessionDep, settings: SettingsDep, who: ReaderDep,
                  state: CommandState | None = None,
                  limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX)] = None
                  ) -> Sequence[CommandPublic]:
    """The device's commands, newest first (``state``: only those in it)."""
    if session.get(Device, device_id) is None:
        raise HTTPException(404, "no device %s" % device_id)
    page = min(limit or settings.limits.page_default, settings.limits.page_max)
    return [command_queue.to_public(c)
            for c in command_queue.of_device(session, device_id, limit=page, state=state)]


def _command(session: Session, command_id: int) -> FleetCommand:
    cmd = command_queue.get_locked(session, command_id)
    if cmd is None:
        raise HTTPException(404, "no command %d" % command_id)
    return cmd


@router.get("/commands/{command_id}", response_model=CommandPublic, responses={404: {}})
def get_command(command_id: CommandId, session: SessionDep, who: ReaderDep) -> CommandPublic:
    """One command: its state, when and how often it was sent, and the device's answer."""
    cmd = session.get(FleetCommand, command_id)
    if cmd is None:
        raise HTTPException(404, "no command %d" % command_id)
    return command_queue.to_public(cmd)


@router.post("/commands/{command_id}/cancel", response_model=CommandPublic,
             responses={404: {}, 409: {}})
def cancel_command(command_id: CommandId, request: Request, session: SessionDep,
                   who: SecurityDep) -> CommandPublic:
    """Stop delivering a command that is still queued or sent (409 once it is answered,
    expired or cancelled). A device that has it already may still carry it out; its
    answer is recorded all the same."""
    cmd = _command(session, command_id)
    try:
        old = command_queue.cancel(session, cmd, by=who.name)
    except CommandError as e:
        session.rollback()
        audit.record(session, actor=who.name, action="command.cancel",
                     outcome=audit.REFUSED, target=cmd.device_id,
                     source=client_address(request),
                     detail={"command": command_id, "why": str(e)})
        raise HTTPException(e.status, str(e)) from e
    audit.append(session, actor=who.name, action="command.cancel", outcome=audit.OK,
                 target=cmd.device_id, source=client_address(request),
                 detail={"command": command_id, "seq": cmd.seq, "name": cmd.name,
                         "was": old.value})
    rotation.on_answer(session, cmd, "cancelled", "cancelled by %s" % who.name,
                       actor=who.name)
    session.commit()
    return command_queue.to_public(cmd)
