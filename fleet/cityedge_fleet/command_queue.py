"""Fleet commands queued per device: the one place that numbers them, signs them and
moves them through their states.

::

    queued -> sent -> ok | refused | failed      (the device's signed result)
       \\        \\---> expired | cancelled        (the fleet stops trying)
        `------------^
    expired, cancelled -> ok | refused | failed  (a result arriving later is still what
                                                  the device did)

``queue`` applies, in order (the first failure refuses with ``CommandError``, which
carries the HTTP status):

1. the device exists (404) and is provisioned or active: only those are at the broker
   (409);
2. the name is a command name (``cityedge_core.command.check_name``) and the arguments
   are plain JSON (objects with text keys, lists, text, integers within 64 bits, finite
   numbers, booleans, null) at most ``COMMAND_ARGS_MAX_DEPTH`` deep and
   ``COMMAND_ARGS_MAX_BYTES`` as CBOR (422);
3. the validity is at most ``command_expires_max_s`` (422);
4. fewer than ``command_pending_max`` of the device's commands are still queued or sent
   (409: a device that does not answer does not pile up commands);
5. its ``seq`` is one above the device's last, assigned while the device's row is locked
   (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` holds the write
   lock already), in the transaction that stores the command, with ``(device_id, seq)``
   unique behind it: two API replicas cannot hand out one seq twice (the second would
   get 409 and its client tries again). Every signed command to a device takes its seq
   from here, whatever channel carries it: the device keeps one counter for all;
6. it is signed (``cityedge_core.command.encode_command``) with the command key, target =
   the device, ``expires`` = UNIX seconds, and stored as signed: every re-send is the same
   bytes.

The key rotations' commands (``rotate``, ``install-cert``, ``erase-key``,
``trust-update``: ``RESERVED_NAMES``) are queued only by ``cityedge_fleet.rotation`` and
``cityedge_fleet.command_key_rotation``, and ``update`` (``OTA_NAMES``) only by an OTA
campaign (``cityedge_fleet.ota_store``); they pass their
CBOR arguments as ``wire_args`` (integer keys, bytes: what the device reads) and a JSON
record of them as ``args``; anyone else asking for those names is refused (422), so a
rotation's state is never moved by a command it did not send.

Everything happens in the caller's transaction; the caller audits and commits.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from cityedge_core import cbor, limits, trust_statement, update_manifest
from cityedge_core import command as corecmd
from cityedge_core import rotation as corerot
from cityedge_core.command_decode import Result
from cityedge_core.errors import CityedgeError, MalformedError
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import (
    ANSWERED_COMMANDS,
    EVENT_DETAIL_MAX,
    PENDING_COMMANDS,
    CommandPublic,
    CommandState,
    Device,
    DeviceState,
    FleetCommand,
    utcnow,
)
from cityedge_host.crypto import EcSigner

AT_BROKER = (DeviceState.provisioned, DeviceState.active)
INT_MIN = -(2**63)  # the arguments' integers: what a device's CBOR decoder and a JSON
INT_MAX = 2**64 - 1  # column both hold without a bignum
RESERVED_NAMES = (corerot.ROTATE, corerot.INSTALL_CERT, corerot.ERASE_KEY,
                  trust_statement.TRUST_UPDATE)
# ``update`` is queued only by an OTA campaign (``ota_store``: the release manager's)
OTA_NAMES = (update_manifest.UPDATE,)
S = CommandState
TRANSITIONS: dict[CommandState, frozenset[CommandState]] = {
    S.queued: frozenset({S.sent, *ANSWERED_COMMANDS, S.expired, S.cancelled}),
    S.sent: frozenset({*ANSWERED_COMMANDS, S.expired, S.cancelled}),
    S.expired: frozenset(ANSWERED_COMMANDS),
    S.cancelled: frozenset(ANSWERED_COMMANDS),
    S.ok: frozenset(), S.refused: frozenset(), S.failed: frozenset(),
}


class CommandError(ValueError):
    """A command refused: ``status`` for the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_args(args: Any) -> bytes:
    """Rule 2 for the arguments: their CBOR (what the command carries), or CommandError."""
    _check_value(args, 0)
    data = cbor.dumps(args)
    if len(data) > limits.COMMAND_ARGS_MAX_BYTES:
        raise CommandError(422, "args: %d bytes as CBOR, at most %d"
                           % (len(data), limits.COMMAND_ARGS_MAX_BYTES))
    return data


def _check_value(value: Any, depth: int) -> None:
    if depth > limits.COMMAND_ARGS_MAX_DEPTH:
        raise CommandError(422, "args: nested deeper than %d" % limits.COMMAND_ARGS_MAX_DEPTH)
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CommandError(422, "args: integers are within 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CommandError(422, "args: numbers must be finite")
        return
    if isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CommandError(422, "args: object keys are text")
            _check_value(item, depth + 1)
        return
    raise CommandError(422, "args: %s is not a JSON value" % type(value).__name__)


def queue(session: Session, *, signer: EcSigner, device_id: str, name: str, args: Any,
          expires_in_s: int | None, created_by: str, lim: FleetLimits,
          now: dt.datetime | None = None, wire_args: Any = None) -> FleetCommand:
    """Number, sign and store a command (rules in the module docstring). ``wire_args``:
    the CBOR value signed instead of ``args`` (the rotation's commands only)."""
    device = session.exec(select(Device).where(col(Device.id) == device_id)
                          .with_for_update()).first()  # rule 5's lock, taken first
    if device is None:
        raise CommandError(404, "no device %s" % device_id)
    if device.state not in AT_BROKER:
        raise CommandError(409, "device %s is %s: only a provisioned or active device is "
                           "at the broker to take commands" % (device_id, device.state))
    try:
        corecmd.check_name(name)
    except MalformedError as e:
        raise CommandError(422, "name: %s" % e) from e
    if wire_args is None:
        if name in RESERVED_NAMES:
            raise CommandError(422, "name: %s is sent by a key rotation only (`cityedge "
                               "keys rotate-device`, `cityedge keys rotate-command-key`)"
                               % name)
        if name in OTA_NAMES:
            raise CommandError(422, "name: %s is sent by an OTA campaign only (`cityedge ota "
                               "campaign create`, the release manager's)" % name)
        check_args(args)
        wire_args = args
    elif len(cbor.dumps(wire_args)) > limits.COMMAND_ARGS_MAX_BYTES:
        raise CommandError(422, "args: over %d bytes as CBOR" % limits.COMMAND_ARGS_MAX_BYTES)
    expires_in = expires_in_s if expires_in_s is not None else lim.command_expires_default_s
    if not 0 < expires_in <= lim.command_expires_max_s:
        raise CommandError(422, "expires_in_s: 1..%d seconds" % lim.command_expires_max_s)
    pending = session.exec(select(func.count()).select_from(FleetCommand).where(
        col(FleetCommand.device_id) == device_id,
        col(FleetCommand.state).in_(PENDING_COMMANDS))).one()
    if pending >= lim.command_pending_max:
        raise CommandError(409, "device %s has %d commands waiting for an answer (at most "
                           "%d): cancel some or wait" % (device_id, pending,
                                                         lim.command_pending_max))
    last = session.exec(select(func.max(FleetCommand.seq)).where(
        col(FleetCommand.device_id) == device_id)).one()
    seq = (last or 0) + 1
    now = (now or utcnow()).replace(microsecond=0)
    expires_at = now + dt.timedelta(seconds=expires_in)
    signed = corecmd.encode_command(signer, signer.kid, name, device_id, seq,
                                    int(expires_at.timestamp()), wire_args)
    row = FleetCommand(device_id=device_id, seq=seq, name=name, args=args, signed=signed,
                       kid=signer.kid.hex(), created_by=created_by, created_at=now,
                       expires_at=expires_at, next_try_at=now)
    session.add(row)
    session.flush()
    return row


def move(cmd: FleetCommand, to: CommandState) -> CommandState:
    """Change ``cmd``'s state if ``TRANSITIONS`` allows it (CommandError 409 if not);
    returns the old state."""
    old = CommandState(cmd.state)
    if to not in TRANSITIONS[old]:
        raise CommandError(409, "command %s is %s; it cannot become %s"
                           % (cmd.id, old.value, to.value))
    cmd.state = to
    return old


def cancel(session: Session, cmd: FleetCommand, *, by: str) -> CommandState:
    """Stop delivering ``cmd`` (a device that has it already may still answer)."""
    old = move(cmd, CommandState.cancelled)
    cmd.finished_by = by
    session.add(cmd)
    return old


def get_locked(session: Session, command_id: int) -> FleetCommand | None:
    return session.exec(select(FleetCommand).where(col(FleetCommand.id) == command_id)
                        .with_for_update()).first()


def for_result(session: Session, device_id: str, seq: int) -> FleetCommand | None:
    """The command of ``device_id`` with ``seq`` (locked), if there is one."""
    return session.exec(select(FleetCommand).where(
        col(FleetCommand.device_id) == device_id, col(FleetCommand.seq) == seq)
        .with_for_update()).first()


def record_result(session: Session, cmd: FleetCommand, result: Result, signed: bytes,
                  now: dt.datetime | None = None) -> CommandState:
    """Store a device's verified result for ``cmd``; returns the state it had."""
    old = move(cmd, CommandState(result.outcome))
    cmd.result_at = now or utcnow()
    cmd.result_detail = bounded_detail(result.detail)
    cmd.result_data = cbor.dumps(result.data) if result.data is not None else None
    cmd.result_signed = signed
    cmd.finished_by = "device:%s" % result.device
    session.add(cmd)
    return old


def bounded_detail(text: str) -> str:
    """Text as any column stores it (PostgreSQL refuses NUL; control characters as ``?``)."""
    text = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return text[:EVENT_DETAIL_MAX].encode("utf-8", "replace").decode("utf-8")


def expire_due(session: Session, now: dt.datetime) -> list[FleetCommand]:
    """Pending commands past their expiry become ``expired`` (returned, to audit)."""
    rows = list(session.exec(select(FleetCommand).where(
        col(FleetCommand.state).in_(PENDING_COMMANDS), col(FleetCommand.expires_at) <= now)
        .order_by(col(FleetCommand.id)).with_for_update()))
    for cmd in rows:
        move(cmd, CommandState.expired)
        cmd.finished_by = "fleet"
        session.add(cmd)
    return rows


def due(session: Session, now: dt.datetime, most: int) -> list[FleetCommand]:
    """Pending, unexpired commands whose next try is due, of devices at the broker, each
    device's in seq order (the device refuses a seq below one it took)."""
    return list(session.exec(
        select(FleetCommand).join(Device, col(Device.id) == FleetCommand.device_id)
        .where(col(FleetCommand.state).in_(PENDING_COMMANDS),
               col(FleetCommand.next_try_at) <= now, col(FleetCommand.expires_at) > now,
               col(Device.state).in_(AT_BROKER))
        .order_by(col(FleetCommand.device_id), col(FleetCommand.seq)).limit(most)))


def claim(session: Session, cmd: FleetCommand, now: dt.datetime, lease_s: float) -> bool:
    """Take ``cmd`` for one try: its ``next_try_at`` moves ``lease_s`` ahead, on the
    condition that it is still due and pending (so two publishers never send it in the
    same round; one that dies leaves it to the next round after the lease)."""
    done = session.execute(
        update(FleetCommand)
        .where(col(FleetCommand.id) == cmd.id, col(FleetCommand.next_try_at) <= now,
               col(FleetCommand.state).in_(PENDING_COMMANDS))
        .values(next_try_at=now + dt.timedelta(seconds=lease_s)))
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def record_try(session: Session, command_id: int, *, delivered: bool, now: dt.datetime,
               next_try_at: dt.datetime) -> FleetCommand | None:
    """A publish the broker acknowledged: ``delivered`` when it had the device's
    subscription (the command is ``sent``), else the device was not there."""
    cmd = get_locked(session, command_id)
    if cmd is None or cmd.state not in PENDING_COMMANDS:
        return None  # answered, cancelled or expired meanwhile: leave it so
    cmd.attempts += 1
    cmd.last_try_at = now
    cmd.next_try_at = next_try_at
    if delivered:
        cmd.sends += 1
        cmd.last_sent_at = now
        cmd.first_sent_at = cmd.first_sent_at or now
        if cmd.state == CommandState.queued:
            move(cmd, CommandState.sent)
    session.add(cmd)
    return cmd


def resend_now(session: Session, devices: Iterable[str], now: dt.datetime) -> int:
    """The devices are back after a silence: their unanswered commands are due now."""
    wanted = sorted(set(devices))
    if not wanted:
        return 0
    done = session.execute(
        update(FleetCommand)
        .where(col(FleetCommand.device_id).in_(wanted),
               col(FleetCommand.state).in_(PENDING_COMMANDS),
               col(FleetCommand.next_try_at) > now)
        .values(next_try_at=now))
    return int(done.rowcount)  # type: ignore[attr-defined]


def of_device(session: Session, device_id: str, *, limit: int,
              state: CommandState | None = None) -> Sequence[FleetCommand]:
    query = select(FleetCommand).where(col(FleetCommand.device_id) == device_id)
    if state is not None:
        query = query.where(col(FleetCommand.state) == state)
    return session.exec(query.order_by(col(FleetCommand.seq).desc()).limit(limit)).all()


def to_public(cmd: FleetCommand) -> CommandPublic:
    data = None
    if cmd.result_data is not None:
        try:
            data = jsonable(cbor.loads(cmd.result_data))
        except CityedgeError:
            data = {"cbor_hex": cmd.result_data.hex()}
    return CommandPublic.model_validate(cmd, update={"result_data": data})


def jsonable(value: Any) -> Any:
    """A decoded CBOR value as JSON: bytes as hex, map keys as text, tags and simple values
    as objects, numbers that are not finite as text."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(jsonable(k)): jsonable(v)
                for k, v in value.items()}
    tag = getattr(value, "tag", None)
    if tag is not None:
        return {"tag": tag, "value": jsonable(getattr(value, "value", None))}
    return repr(value)
