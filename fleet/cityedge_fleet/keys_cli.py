"""``cityedge keys``: the security team's keys and signed commands, on the fleet's host.

- ``init-command-key``: create the fleet's command key (``command_key``), once;
- ``command DEVICE NAME``: queue a signed command for a device (``command_queue``; the
  publisher of ``fleet serve`` delivers it);
- ``commands DEVICE``: the device's commands, their delivery and answers;
- ``cancel ID``: stop delivering one;
- ``rotate-device DEVICE``: rotate a device's key (``rotation``; the protocol is in
  ``cityedge_core.rotation``), ``rotations DEVICE``: its rotations and their state;
- ``revoke DEVICE --reason key-compromise``: emergency revocation (``revoke``): every
  certificate revoked, CRL re-signed, broker reloaded, the device cut and quarantined.

Like ``fleet create-token`` they work on the fleet's database and files directly (the
settings of ``fleet serve``), and every change is audited with actor ``cli``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from cityedge_fleet import campaign_cli
from cityedge_fleet.cli import _engine, load_settings
from cityedge_host.errors import UserError

keys_app = typer.Typer(help="Keys and signed fleet commands (security team).",
                       no_args_is_help=True)


@keys_app.command("init-command-key")
def init_command_key_command() -> None:
    """Create the fleet's command key (CITYEDGE_COMMAND_KEY_FILE, P-256, mode 0600); refuses
    to replace one. Devices enrolled from now on trust its public half."""
    from cityedge_fleet import audit, command_key
    from cityedge_host.crypto import public_sec1

    settings = load_settings()
    path = settings.command_key_file
    signer = command_key.create(path)
    with Session(_engine(settings)) as session:
        audit.append(session, actor="cli", action="command_key.create", outcome=audit.OK,
                     target=signer.kid.hex(), source="local", detail={"file": str(path)})
        session.commit()
    print("command key created: %s (mode 0600; back it up off this host)" % path)
    print("kid %s, public key %s" % (signer.kid.hex(), public_sec1(signer.public_key).hex()))


def _args(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError("--args is not JSON: %s" % e,
                        'give a JSON value, e.g. --args \'{"sample_interval_s": 30}\'') from e


@keys_app.command("command")
def command_command(
    device: Annotated[str, typer.Argument(help="The device's URN.")],
    name: Annotated[str, typer.Argument(help="The command, e.g. status.")],
    args: Annotated[str | None, typer.Option(help="Its arguments, as JSON.")] = None,
    expires_in: Annotated[int | None, typer.Option(
        "--expires-in", help="Seconds it stays valid (default: the fleet's limit).")] = None,
) -> None:
    """Queue a signed command for DEVICE; `fleet serve` delivers it until the device
    answers or it expires."""
    from cityedge_fleet import audit, command_key, command_queue

    settings = load_settings()
    value = _args(args)
    signer = command_key.from_settings(settings)
    with Session(_engine(settings)) as session:
        try:
            cmd = command_queue.queue(session, signer=signer, device_id=device, name=name,
                                      args=value, expires_in_s=expires_in, created_by="cli",
                                      lim=settings.limits)
            audit.append(session, actor="cli", action="command.create", outcome=audit.OK,
                         target=device, source="local",
                         detail={"command": cmd.id, "seq": cmd.seq, "name": cmd.name,
                                 "expires_at": cmd.expires_at.isoformat(), "kid": cmd.kid})
            session.commit()
        except (command_queue.CommandError, IntegrityError) as e:
            session.rollback()
            why = str(e) if isinstance(e, command_queue.CommandError) else \
                "another command was queued at the same moment"
            audit.record(session, actor="cli", action="command.create",
                         outcome=audit.REFUSED, target=device, source="local",
                         detail={"name": name, "why": why})
            raise UserError("command refused: %s" % why) from e
        print("command %d queued: %s #%d for %s, expires %s" % (
            cmd.id or 0, cmd.name, cmd.seq, device, cmd.expires_at.isoformat()))


@keys_app.command("commands")
def commands_command(
    device: Annotated[str, typer.Argument(help="The device's URN.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON, one object per command.")]
    = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest first.")] = 50,
) -> None:
    """The device's commands: state, tries, sends, and the device's answer."""
    from cityedge_fleet import command_queue
    from cityedge_fleet.models import Device

    settings = load_settings()
    with Session(_engine(settings)) as session:
        if session.get(Device, device) is None:
            raise UserError("no device %s" % device)
        rows = [command_queue.to_public(c)
                for c in command_queue.of_device(session, device, limit=limit)]
    if as_json:
        json.dump([r.model_dump(mode="json") for r in rows], sys.stdout, indent=1)
        print()
        return
    print("%6s %6s %-16s %-9s %5s %5s  %-25s %s" % ("id", "seq", "name", "state", "tries",
                                                     "sends", "expires", "answer"))
    for r in rows:
        print("%6d %6d %-16s %-9s %5d %5d  %-25s %s" % (
            r.id, r.seq, r.name, r.state.value, r.attempts, r.sends,
            r.expires_at.isoformat(timespec="seconds"), r.result_detail))


@keys_app.command("cancel")
def cancel_command(
    command_id: Annotated[int, typer.Argument(help="The command's id (see `commands`).")],
) -> None:
    """Stop delivering a command still queued or sent."""
    from cityedge_fleet import audit, command_queue, rotation

    settings = load_settings()
    with Session(_engine(settings)) as session:
        cmd = command_queue.get_locked(session, command_id)
        if cmd is None:
            raise UserError("no command %d" % command_id)
        try:
            old = command_queue.cancel(session, cmd, by="cli")
        except command_queue.CommandError as e:
            raise UserError(str(e)) from e
        audit.append(session, actor="cli", action="command.cancel", outcome=audit.OK,
                     target=cmd.device_id, source="local",
                     detail={"command": command_id, "seq": cmd.seq, "name": cmd.name,
                             "was": old.value})
        rotation.on_answer(session, cmd, "cancelled", "cancelled by cli", actor="cli")
        session.commit()
    print("command %d cancelled (was %s)" % (command_id, old.value))


@keys_app.command("rotate-device")
def rotate_device_command(
    device: Annotated[str, typer.Argument(help="The device's URN.")],
) -> None:
    """Rotate DEVICE's key: queue the signed rotate command; `fleet serve` delivers it and
    the ingest takes the device's CSR, issues the new certificate and revokes the old one
    once a batch signed with the new key is stored (see `keys rotations DEVICE`)."""
    from cityedge_fleet import audit, command_key, command_queue, rotation

    settings = load_settings()
    signer = command_key.from_settings(settings)
    with Session(_engine(settings)) as session:
        try:
            rot = rotation.start_rotation(session, device, by="cli", signer=signer,
                                          lim=settings.limits)
            session.commit()
        except (rotation.RotationError, command_queue.CommandError, IntegrityError) as e:
            session.rollback()
            why = str(e) if not isinstance(e, IntegrityError) else \
                "another change to the device at the same moment; try again"
            audit.record(session, actor="cli", action="rotation.start",
                         outcome=audit.REFUSED, target=device, source="local",
                         detail={"why": why})
            raise UserError("rotation refused: %s" % why) from e
        print("rotation %d of %s: %s (old key %s); the rotate command is queued"
              % (rot.id or 0, device, rot.state, rot.old_kid))


@keys_app.command("rotations")
def rotations_command(
    device: Annotated[str, typer.Argument(help="The device's URN.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON, one object per rotation.")]
    = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest first.")] = 20,
) -> None:
    """DEVICE's key rotations: state, keys, and why one failed."""
    from cityedge_fleet import rotation
    from cityedge_fleet.models import Device

    settings = load_settings()
    with Session(_engine(settings)) as session:
        if session.get(Device, device) is None:
            raise UserError("no device %s" % device)
        rows = [rotation.to_public(r) for r in rotation.of_device(session, device,
                                                                  limit=limit)]
    if as_json:
        json.dump([r.model_dump(mode="json") for r in rows], sys.stdout, indent=1)
        print()
        return
    print("%6s %-12s %-16s %-16s %-25s %s" % ("id", "state", "old kid", "new kid",
                                              "updated", "reason"))
    for r in rows:
        print("%6d %-12s %-16s %-16s %-25s %s" % (
            r.id, r.state.value, r.old_kid, r.new_kid or "-",
            r.updated_at.isoformat(timespec="seconds"), r.reason))


@keys_app.command("revoke")
def revoke_command(
    device: Annotated[str, typer.Argument(help="The device's URN.")],
    reason: Annotated[str, typer.Option(help="key-compromise, ca-compromise, "
                                        "affiliation-changed, superseded, "
                                        "cessation-of-operation or unspecified.")]
    = "key-compromise",
    note: Annotated[str, typer.Option(help="Free text for the audit log.")] = "",
) -> None:
    """Emergency revocation of DEVICE: every certificate revoked, the CRL re-signed and the
    broker reloaded, the device cut at the broker and quarantined; the ingest refuses its
    batches from now on."""
    from cityedge_fleet import revoke
    from cityedge_fleet.broker_sync import BrokerAccess
    from cityedge_fleet.ca import CaError, CertificateAuthority
    from cityedge_fleet.models import RevokeReason

    try:
        why = RevokeReason(reason)
    except ValueError as e:
        raise UserError("--reason %s is not a revocation reason" % reason,
                        "one of: %s" % ", ".join(r.value for r in RevokeReason)) from e
    settings = load_settings()
    try:
        ca = CertificateAuthority(settings.ca_dir)
    except CaError as e:
        raise UserError(str(e), "run it where the fleet's CA directory is") from e
    broker = BrokerAccess.from_settings(settings)
    try:
        with Session(_engine(settings)) as session:
            try:
                done = revoke.revoke_device(session, device_id=device, reason=why, note=note,
                                            by="cli", source="local", ca=ca,
                                            settings=settings, broker=broker)
            except revoke.RevokeError as e:
                raise UserError(str(e)) from e
    finally:
        broker.close()
    print("%s revoked (%s): %d certificates (%s), device %s, broker %s" % (
        device, why.value, len(done.revoked), ", ".join(done.revoked) or "none left",
        done.state.value, "cut" if done.broker_cut else "NOT told (the CRL refuses it; "
        "the reconciler cuts it)"))


campaign_cli.register(keys_app)  # rotate, status, pause, resume, abort, campaigns, report
