"""Rotating the fleet's command key over HTTP (``command_key_rotation``): the security team
starts rolling out a root-signed trust statement and follows it. Only the security role
(and admins) may; the statement itself proves the root's consent, the API only decides
when the fleet rolls it out. The switch of the signing key stays on the fleet's host
(``cityedge keys rotate-command-key --switch``): it moves key files there. Every start is
audited, a refusal too."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence

from fastapi import APIRouter, HTTPException, Request

from cityedge_fleet import audit, command_key
from cityedge_fleet import command_key_rotation as ckr
from cityedge_fleet.api.commands import _wake_publisher
from cityedge_fleet.api.deps import CommandKeyDep, SecurityDep, SettingsDep
from cityedge_fleet.auth import client_address
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import CommandKeyRotationPublic, CommandKeyRotationStart

router = APIRouter(tags=["keys"])


@router.post("/command-key/rotations", response_model=CommandKeyRotationPublic,
             status_code=201, responses={409: {}, 422: {}, 503: {}})
def start_command_key_rotation(body: CommandKeyRotationStart, request: Request,
                               session: SessionDep, settings: SettingsDep,
                               signer: CommandKeyDep,
                               who: SecurityDep) -> CommandKeyRotationPublic:
    """Roll out a statement of the offline root: a ``trust-update`` command, signed by the
    current command key, is queued for every device at the broker."""
    source = client_address(request)
    try:
        try:
            data = base64.b64decode(body.statement, validate=True)
        except (binascii.Error, ValueError) as e:  # ValueError: not ASCII
            raise ckr.CommandKeyRotationError(422, "statement: not base64") from e
        nxt_path = ckr.next_key_path(settings.command_key_file)
        if not nxt_path.exists():
            raise ckr.CommandKeyRotationError(409, "no next command key on the fleet's "
                                              "host: run `cityedge keys command-keygen`")
        done = ckr.start(session, data=data, root=ckr.root_verifier(settings.ca_dir),
                         current=signer, nxt=command_key.load(nxt_path),
                         threshold_pct=body.threshold_pct, by=who.name, lim=settings.limits)
        rot = done.rotation
        audit.append(session, actor=who.name, action="command_key.rotate", outcome=audit.OK,
                     target=rot.statement_sha256[:16], source=source,
                     detail={"rotation": rot.id, "version": rot.version,
                             "old_kid": rot.old_kid, "new_kid": rot.new_kid,
                             "queued": len(done.queued),
                             "left_out": dict(list(done.left_out.items())[:20])})
        session.commit()
    except (ckr.CommandKeyRotationError, command_key.CommandKeyError) as e:
        session.rollback()
        status = getattr(e, "status", 503)
        audit.record(session, actor=who.name, action="command_key.rotate",
                     outcome=audit.REFUSED, target=hashlib.sha256(
                         body.statement.encode()).hexdigest()[:16], source=source,
                     detail={"why": str(e)})
        raise HTTPException(status, str(e)) from e
    _wake_publisher(request)
    return ckr.to_public(session, rot)


@router.get("/command-key/rotations", response_model=list[CommandKeyRotationPublic])
def list_command_key_rotations(session: SessionDep, who: SecurityDep
                               ) -> Sequence[CommandKeyRotationPublic]:
    """The fleet's command key rotations, newest first, with each one's device counts."""
    return [ckr.to_public(session, r) for r in ckr.of_fleet(session)]
