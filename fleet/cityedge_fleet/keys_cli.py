"""``cityedge keys``: the security team's keys and signed commands, on the fleet's host.

- ``init-command-key``: create the fleet's command key (``command_key``), once;
- ``command DEVICE NAME``: queue a signed command for a device (``command_queue``; the
  publisher of ``fleet serve`` delivers it);
- ``commands DEVICE``: the device's commands, their delivery and answers;
- ``cancel ID``: stop delivering one;
- ``rotate-device DEVICE``: rotate a device's key (``rotation``; the protocol is in
  ``cityedge_core.rotation``), ``rotations DEVICE``: its rotations and their state;
- ``revoke DEVICE --reason key-compromise``: emergency revocation (``revoke``): every
  certificate revoked, CRL re-signed, broker reloaded, the device cut and quarantined;
- rotating the command key itself (``command_key_rotation``): ``command-keygen`` (the
  next key, on the fleet's host), ``announce-command-key`` (the root's statement, where
  the offline root is; no fleet database needed), ``rotate-command-key`` (roll the
  statement out, follow it, ``--resend``, ``--switch``).

Like ``fleet create-token`` they work on the fleet's database and files directly (the
settings of ``fleet serve``), and every change is audited with actor ``cli``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from cityedge_fleet import campaign_cli
from cityedge_fleet.cli import _engine, _reading, load_settings
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
    with Session(_reading(settings)) as session:
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
    with Session(_reading(settings)) as session:
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
    from cityedge_fleet.ca_custody import custody_of
    from cityedge_fleet.models import RevokeReason

    try:
        why = RevokeReason(reason)
    except ValueError as e:
        raise UserError("--reason %s is not a revocation reason" % reason,
                        "one of: %s" % ", ".join(r.value for r in RevokeReason)) from e
    settings = load_settings()
    try:
        ca = CertificateAuthority(settings.ca_dir, custody_of(settings))
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


@keys_app.command("command-keygen")
def command_keygen_command() -> None:
    """Make the NEXT command key beside the current one (<key file>.next, 0600); prints its
    public half only, for `keys announce-command-key --new-key-pub` at the offline root."""
    from cityedge_fleet import audit, command_key, command_key_rotation
    from cityedge_host.crypto import public_sec1

    settings = load_settings()
    try:
        signer = command_key_rotation.keygen(settings.command_key_file)
    except command_key.CommandKeyError as e:
        raise UserError(str(e).replace("init-command-key", "command-keygen"),
                        "a rotation in progress uses it; finish or abandon that one") from e
    with Session(_engine(settings)) as session:
        audit.append(session, actor="cli", action="command_key.next", outcome=audit.OK,
                     target=signer.kid.hex(), source="local",
                     detail={"file": str(command_key_rotation.next_key_path(
                         settings.command_key_file))})
        session.commit()
    print("next command key made (mode 0600, on this host only): kid %s" % signer.kid.hex())
    print(public_sec1(signer.public_key).hex())


def _point(path: Path) -> bytes:
    from cityedge_host.crypto import KeyFileError, load_verifier, public_sec1

    try:
        return public_sec1(load_verifier(path).public_key)
    except KeyFileError as e:
        raise UserError(str(e), "give the public key `keys command-keygen` printed (hex "
                        "in a file), or a PEM public key") from e


def _when(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise UserError("%r is not a date" % text, "e.g. 2026-12-24 or "
                        "2026-12-24T12:00:00+00:00") from e
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@keys_app.command("announce-command-key")
def announce_command_key_command(
    root_dir: Annotated[Path, typer.Option(help="The offline root's directory (`ca init "
                                           "--root-dir`).")],
    new_key_pub: Annotated[Path, typer.Option(help="The next command key's public half "
                                              "(what `keys command-keygen` printed).")],
    out: Annotated[Path, typer.Option(help="Where the signed statement goes.")],
    old_key_pub: Annotated[Path | None, typer.Option(
        help="The current command key's public half, kept until --keep-old-until.")] = None,
    keep_old_until: Annotated[str | None, typer.Option(
        help="Until when devices still obey the old key (UTC date or ISO time).")] = None,
    valid_days: Annotated[int, typer.Option(min=1, max=366, help="Days the fleet has to "
                                            "roll the statement out.")] = 14,
    root_password_file: Annotated[Path | None, typer.Option(
        help="The file holding the root key's passphrase (mode 0600), when `ca init "
             "--root-password-file` encrypted it.")] = None,
) -> None:
    """At the offline root: sign the trust statement that makes devices obey the new
    command key (and the old one until --keep-old-until). Needs no fleet database; the
    root key never leaves --root-dir."""
    import hashlib

    from cityedge_core import cose
    from cityedge_fleet import command_key_rotation as ckr
    from cityedge_host.files import write_atomic

    try:
        done = ckr.announce(root_dir, _point(new_key_pub),
                            old_point=_point(old_key_pub) if old_key_pub else None,
                            keep_old_until=_when(keep_old_until) if keep_old_until else None,
                            valid_s=valid_days * 86400,
                            root_password_file=root_password_file)
    except ckr.CommandKeyRotationError as e:
        raise UserError(str(e)) from e
    write_atomic(out, done.statement, 0o644)
    print("statement v%d written to %s (sha256 %s), to roll out until %s" % (
        done.version, out, hashlib.sha256(done.statement).hexdigest(),
        dt.datetime.fromtimestamp(done.expires, dt.UTC).isoformat()))
    for point, until in done.keys:
        print("  key %s %s" % (cose.kid_for_public_key(point).hex(), "kept" if until is None
                               else "until %s" % dt.datetime.fromtimestamp(
                                   until, dt.UTC).isoformat()))


def _print_rotation(p: Any) -> None:
    print("command key rotation %d: statement v%d, %s; key %s -> %s%s" % (
        p.id, p.version, p.state.value, p.old_kid, p.new_kid,
        "" if p.keep_old_until is None else
        " (old key obeyed until %s)" % p.keep_old_until.isoformat()))
    print("  devices %d: installed %d, pending %d, refused %d, lapsed %d; switch at %d%%" % (
        p.devices, p.installed, p.pending, p.refused, p.lapsed, p.threshold_pct))
    if p.enrolled:
        print("  enrolled with the statement (counted as installed): %d devices" % p.enrolled)


@keys_app.command("rotate-command-key")
def rotate_command_key_command(
    statement: Annotated[Path | None, typer.Option(
        help="Start: roll out this root-signed statement (`announce-command-key --out`).")]
    = None,
    threshold: Annotated[int, typer.Option(min=1, max=100, help="Percent of devices that "
                                           "must install it before --switch.")] = 100,
    resend: Annotated[bool, typer.Option(help="Queue it again for devices without an "
                                         "ok.")] = False,
    switch: Annotated[bool, typer.Option(help="Sign with the new key from now on (when "
                                         "the threshold is reached).")] = False,
    force: Annotated[bool, typer.Option(help="With --switch: below the threshold too.")]
    = False,
) -> None:
    """Rotate the fleet's command key: with --statement, queue a trust-update (signed by
    the current key) for every device; then watch it (no option), --resend, and --switch
    (restart `fleet serve` after it)."""
    import hashlib

    from cityedge_fleet import audit, command_key
    from cityedge_fleet import command_key_rotation as ckr

    if statement is not None and (resend or switch):
        raise UserError("--statement starts a rotation; --resend and --switch act on the one "
                        "rolling out: one at a time")
    if force and not switch:
        raise UserError("--force goes with --switch")
    settings = load_settings()
    key_file = settings.command_key_file
    action = ("command_key.rotate" if statement is not None else
              "command_key.switch" if switch else "command_key.resend")
    changes = statement is not None or resend or switch
    with Session(_engine(settings)) as session:
        try:
            if statement is not None:
                try:
                    data = statement.read_bytes()
                except OSError as e:
                    raise UserError("cannot read %s: %s" % (statement, e.strerror)) from e
                nxt_path = ckr.next_key_path(key_file)
                if not nxt_path.exists():
                    raise UserError("no next command key at %s" % nxt_path,
                                    "make it with `cityedge keys command-keygen`")
                target = hashlib.sha256(data).hexdigest()[:16]
                done = ckr.start(session, data=data,
                                 root=ckr.root_verifier(settings.ca_dir),
                                 current=command_key.from_settings(settings),
                                 nxt=command_key.load(nxt_path), threshold_pct=threshold,
                                 by="cli", lim=settings.limits)
                rot = done.rotation
                detail: dict[str, Any] = {"rotation": rot.id, "version": rot.version,
                                          "old_kid": rot.old_kid, "new_kid": rot.new_kid,
                                          "queued": len(done.queued),
                                          "left_out": dict(list(done.left_out.items())[:20])}
            else:
                found = ckr.current(session)
                if found is None:
                    raise UserError("no command key rotation yet",
                                    "start one with --statement")
                rot = found
                target = "v%d" % rot.version
                detail = {"rotation": rot.id, "version": rot.version}
                if resend:
                    retired = ckr.retired_key_path(key_file)
                    signer = command_key.load(retired) if rot.state == ckr.SWITCHED \
                        else command_key.from_settings(settings)
                    done = ckr.resend(session, rot, signer, by="cli", lim=settings.limits)
                    detail.update(queued=len(done.queued), left_out=len(done.left_out))
                if switch:
                    counted = ckr.switch(session, rot, key_file, force=force)
                    detail.update(forced=force, new_kid=rot.new_kid,
                                  installed=len(counted.answered),
                                  enrolled=sorted(counted.enrolled)[:20],
                                  enrolled_count=len(counted.enrolled))
            if changes:
                audit.append(session, actor="cli", action=action, outcome=audit.OK,
                             target=target, source="local", detail=detail)
            session.commit()
        except (ckr.CommandKeyRotationError, command_key.CommandKeyError) as e:
            session.rollback()
            if changes:
                audit.record(session, actor="cli", action=action, outcome=audit.REFUSED,
                             target=str(statement or "-"), source="local",
                             detail={"why": str(e)})
            raise UserError("command key rotation refused: %s" % e) from e
        _print_rotation(ckr.to_public(session, rot))
    if statement is not None:
        print("  trust-update queued for %d devices; left out %d%s" % (
            len(done.queued), len(done.left_out), "".join(
                "\n    %s: %s" % kv for kv in list(done.left_out.items())[:20])))
    if switch:
        print("  switched: %s signs from now on; the old key is kept as %s for --resend. "
              "A running `fleet serve` and `fleet ingest` sign with it from their next "
              "command (no restart)." % (key_file, ckr.retired_key_path(key_file)))


campaign_cli.register(keys_app)  # rotate, status, pause, resume, abort, campaigns, report
