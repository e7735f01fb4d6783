"""Rotating the fleet's command key: rolling out the offline root's trust statement, then
switching the key that signs.

Who holds what: the **root** (offline, the operator's directory) signs a statement
(``cityedge_core.trust_statement``) listing the new key and, for an overlap, the old one
with an end (``cityedge keys announce-command-key``, ``announce``); the **fleet** holds
the old key (``CITYEDGE_COMMAND_KEY_FILE``) and the new one beside it (``<file>.next``,
made by ``cityedge keys command-keygen``: the new private key never leaves the fleet's
host, the root never comes to it). Neither alone changes what a device obeys.

``start`` applies, in order (the first failure refuses with ``CommandKeyRotationError``,
which carries the HTTP status):

1. the statement passes ``check_statement`` against the root certificate the fleet's CA
   directory holds (kid, signature, shape, window) and its version is above every
   statement the fleet rolled out before (422; 409 for a stale version);
2. no other rotation is rolling out (409);
3. it lists the next key (``<file>.next``) without an end, and the current key either
   without an end or with one in the future: the fleet must be able to command a device
   that installed it while the others have not (422);
4. a ``trust-update`` command (signed by the *current* key, carrying the statement) is
   queued for every device at the broker (``command_queue``; a device that cannot take
   one now is left out and named); the rotation row records the statement.

The devices' answers move their commands (``ok``: installed). ``to_public`` counts them;
``switch`` makes the next key the signing key once ``threshold_pct`` of the devices at
the broker installed the statement (``force`` below it). A device counts as installed
when it answered ``ok``, or when the fleet handed it this very statement in its
enrollment answer (``Device.trust_version``, written by ``enrollment.hand_out_statement``:
the fleet's own record, nothing the device says; the device installs it at enrollment,
so it may never get a ``trust-update`` to answer). The current file is kept as
``<file>.retired`` (it signs ``resend``'s trust-updates for devices still on the old set,
while their overlap runs) and ``<file>.next`` takes its place (each a rename: a crash
leaves one of the two states, and ``switch`` again finishes it). ``fleet serve`` and
``fleet ingest`` hold the key as a ``command_key.KeyFile``, which loads the file again
when it changes: no restart. ``resend`` queues the statement again for devices without
an ``ok``. Every step is audited by the caller.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from cityedge_core import trust_statement
from cityedge_core.errors import PeerError
from cityedge_core.trust_statement import TrustStatement
from cityedge_fleet import command_key, command_queue
from cityedge_fleet.ca import ROOT_CERT, ROOT_KEY
from cityedge_fleet.ca_custody import CaError, Custody, is_encrypted, load_key
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import (
    ANSWERED_COMMANDS,
    PENDING_COMMANDS,
    CommandKeyRotation,
    CommandKeyRotationPublic,
    CommandKeyRotationState,
    CommandState,
    Device,
    FleetCommand,
    utcnow,
)
from cityedge_host.crypto import (
    EcSigner,
    EcVerifier,
    KeyFileError,
    load_signer,
    load_verifier,
    public_sec1,
)
from cityedge_host.files import write_atomic

ROLLING_OUT = CommandKeyRotationState.rolling_out
SWITCHED = CommandKeyRotationState.switched
VERSION_FILE = "trust-version"  # in the root's directory: the last version it signed
ANNOUNCE_VALID_DEFAULT_S = 14 * 86400  # seconds: a statement's install window
NEXT_SUFFIX = ".next"
RETIRED_SUFFIX = ".retired"


class CommandKeyRotationError(ValueError):
    """A rotation step refused: ``status`` for the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def next_key_path(current: Path) -> Path:
    return current.with_name(current.name + NEXT_SUFFIX)


def retired_key_path(current: Path) -> Path:
    return current.with_name(current.name + RETIRED_SUFFIX)


def keygen(current: Path) -> EcSigner:
    """The next command key, beside the current one (0600; refuses to replace one)."""
    return command_key.create(next_key_path(current))


def root_verifier(ca_dir: Path) -> EcVerifier:
    """The offline root's public key, from the root certificate in the CA directory."""
    try:
        return load_verifier(ca_dir / ROOT_CERT)
    except KeyFileError as e:
        raise CommandKeyRotationError(503, "the root certificate: %s" % e) from e


def latest(session: Session) -> CommandKeyRotation | None:
    return session.exec(select(CommandKeyRotation)
                        .order_by(col(CommandKeyRotation.version).desc())).first()


def check(session: Session, data: bytes, root: EcVerifier, current: EcSigner,
          nxt: EcSigner, now: dt.datetime) -> TrustStatement:
    """Rules 1-3: the statement, if the fleet may roll it out."""
    last = latest(session)
    held = last.version if last is not None else 0
    try:
        st = trust_statement.check_statement(data, root, root.kid, held,
                                             int(now.timestamp()))
    except trust_statement.StatementRefused as e:
        raise CommandKeyRotationError(409 if e.rollback else 422, str(e)) from e
    except PeerError as e:
        raise CommandKeyRotationError(422, str(e)) from e
    rolling = session.exec(select(CommandKeyRotation).where(
        col(CommandKeyRotation.state) == ROLLING_OUT)).first()
    if rolling is not None:
        raise CommandKeyRotationError(409, "rotation %s (statement v%d) is rolling out: "
                                      "switch or abandon it first"
                                      % (rolling.id, rolling.version))
    keys = dict(st.keys)
    nxt_point, cur_point = public_sec1(nxt.public_key), public_sec1(current.public_key)
    if nxt_point not in keys:
        raise CommandKeyRotationError(422, "the statement does not list this fleet's next "
                                      "key %s (`cityedge keys command-keygen` made it)"
                                      % nxt.kid.hex())
    if keys[nxt_point] is not None:
        raise CommandKeyRotationError(422, "the statement gives the next key an end")
    if cur_point not in keys:
        raise CommandKeyRotationError(422, "the statement drops the current key %s at once: "
                                      "the fleet could not command a device that installed "
                                      "it before the others (announce with "
                                      "--keep-old-until)" % current.kid.hex())
    until = keys[cur_point]
    if until is not None and until <= now.timestamp():
        raise CommandKeyRotationError(422, "the statement's overlap for the current key "
                                      "is over already")
    return st


@dataclass
class Started:
    rotation: CommandKeyRotation
    queued: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # device -> why


def start(session: Session, *, data: bytes, root: EcVerifier, current: EcSigner,
          nxt: EcSigner, threshold_pct: int, by: str, lim: FleetLimits,
          now: dt.datetime | None = None) -> Started:
    """Every rule: the rotation row, and a trust-update queued for each device."""
    now = (now or utcnow()).replace(microsecond=0)  # as its commands' created_at
    if not 1 <= threshold_pct <= 100:
        raise CommandKeyRotationError(422, "threshold_pct: 1..100")
    st = check(session, data, root, current, nxt, now)
    keys = dict(st.keys)
    until = keys[public_sec1(current.public_key)]
    rot = CommandKeyRotation(
        version=st.version, statement=data, statement_sha256=hashlib.sha256(data).hexdigest(),
        old_kid=current.kid.hex(), new_kid=nxt.kid.hex(),
        keep_old_until=None if until is None else dt.datetime.fromtimestamp(until, dt.UTC),
        expires_at=dt.datetime.fromtimestamp(st.expires, dt.UTC), threshold_pct=threshold_pct,
        created_by=by, created_at=now, updated_at=now)
    session.add(rot)
    session.flush()
    done = Started(rot)
    _queue_all(session, rot, current, by, lim, now, done, skip=set())
    return done


def _queue_all(session: Session, rot: CommandKeyRotation, signer: EcSigner, by: str,
               lim: FleetLimits, now: dt.datetime, done: Started, skip: set[str]) -> None:
    devices = session.exec(select(Device.id).where(
        col(Device.state).in_(command_queue.AT_BROKER)).order_by(col(Device.id))).all()
    expires_in = min(lim.command_expires_max_s,
                     max(1, int((rot.expires_at - now).total_seconds())))
    for device_id in devices:
        if device_id in skip:
            continue
        try:
            with session.begin_nested():  # one device's refusal leaves the others queued
                command_queue.queue(
                    session, signer=signer, device_id=device_id,
                    name=trust_statement.TRUST_UPDATE,
                    args={"rotation": rot.id, "version": rot.version,
                          "statement_sha256": rot.statement_sha256},
                    wire_args={trust_statement.A_STATEMENT: rot.statement},
                    expires_in_s=expires_in, created_by=by, lim=lim, now=now)
            done.queued.append(device_id)
        except command_queue.CommandError as e:
            done.left_out[device_id] = str(e)


def _commands(session: Session, rot: CommandKeyRotation) -> list[FleetCommand]:
    rows = session.exec(select(FleetCommand).where(
        col(FleetCommand.name) == trust_statement.TRUST_UPDATE,
        col(FleetCommand.created_at) >= rot.created_at).order_by(col(FleetCommand.id)))
    return [c for c in rows if isinstance(c.args, dict) and c.args.get("rotation") == rot.id]


def device_states(session: Session, rot: CommandKeyRotation) -> dict[str, CommandState]:
    """Each device's best answer to this rotation's trust-updates (ok wins: installed)."""
    rank = {CommandState.ok: 4, CommandState.queued: 3, CommandState.sent: 3,
            CommandState.refused: 2, CommandState.failed: 2, CommandState.expired: 1,
            CommandState.cancelled: 1}
    out: dict[str, CommandState] = {}
    for c in _commands(session, rot):
        s = CommandState(c.state)
        if c.device_id not in out or rank[s] > rank[out[c.device_id]]:
            out[c.device_id] = s
    return out


def enrolled_with(session: Session, rot: CommandKeyRotation) -> set[str]:
    """The devices at the broker that the fleet handed this rotation's statement at their
    enrollment (``Device.trust_version``)."""
    return set(session.exec(select(Device.id).where(
        col(Device.trust_version) == rot.version,
        col(Device.state).in_(command_queue.AT_BROKER))).all())


@dataclass(frozen=True)
class Installed:
    """Who counts as having installed a rotation's statement: ``answered`` ok, or handed
    it at enrollment (``enrolled``: those without an ok answer, so the two never overlap)."""

    answered: set[str]
    enrolled: set[str]

    @property
    def count(self) -> int:
        return len(self.answered) + len(self.enrolled)


def installed(session: Session, rot: CommandKeyRotation,
              states: dict[str, CommandState] | None = None) -> Installed:
    if states is None:
        states = device_states(session, rot)
    answered = {d for d, s in states.items() if s == CommandState.ok}
    return Installed(answered, enrolled_with(session, rot) - answered)


def to_public(session: Session, rot: CommandKeyRotation) -> CommandKeyRotationPublic:
    by_device = device_states(session, rot)
    states = list(by_device.values())
    out = CommandKeyRotationPublic.model_validate(rot, from_attributes=True)
    out.devices = len(states)
    out.installed = states.count(CommandState.ok)
    out.enrolled = len(installed(session, rot, by_device).enrolled)
    out.refused = sum(1 for s in states if s in ANSWERED_COMMANDS and s != CommandState.ok)
    out.pending = sum(1 for s in states if s in PENDING_COMMANDS)
    out.lapsed = out.devices - out.installed - out.refused - out.pending
    return out


def current(session: Session) -> CommandKeyRotation | None:
    """The rotation rolling out, else the newest one."""
    rolling = session.exec(select(CommandKeyRotation).where(
        col(CommandKeyRotation.state) == ROLLING_OUT)).first()
    return rolling or latest(session)


def threshold_reached(session: Session, rot: CommandKeyRotation,
                      counted: Installed | None = None) -> bool:
    """``threshold_pct`` of the devices at the broker installed the statement (answered
    ok, or were handed it at enrollment: ``installed``)."""
    at_broker = session.exec(select(func.count()).select_from(Device).where(
        col(Device.state).in_(command_queue.AT_BROKER))).one()
    n = (counted or installed(session, rot)).count
    return at_broker == 0 or n * 100 >= rot.threshold_pct * at_broker


def switch(session: Session, rot: CommandKeyRotation, key_file: Path, *, force: bool,
           now: dt.datetime | None = None) -> Installed:
    """Make the next key the signing key (rules in the module docstring); returns who
    counted as installed, for the caller's audit."""
    if rot.state != ROLLING_OUT:
        raise CommandKeyRotationError(409, "rotation %s is %s" % (rot.id, rot.state))
    counted = installed(session, rot)
    if not force and not threshold_reached(session, rot, counted):
        raise CommandKeyRotationError(409, "%d devices installed the statement (%d of them "
                                      "enrolled with it), %d%% are needed: wait, resend, "
                                      "or switch with --force"
                                      % (counted.count, len(counted.enrolled),
                                         rot.threshold_pct))
    nxt, retired = next_key_path(key_file), retired_key_path(key_file)
    if nxt.exists():
        if command_key.load(nxt).kid.hex() != rot.new_kid:
            raise CommandKeyRotationError(409, "%s is not the key the statement announced"
                                          % nxt)
        if key_file.exists():
            if command_key.load(key_file).kid.hex() != rot.old_kid:
                raise CommandKeyRotationError(409, "%s is not the key the rotation started "
                                              "with" % key_file)
            os.replace(key_file, retired)
        elif not retired.exists():
            raise CommandKeyRotationError(409, "%s is missing and nothing was retired: "
                                          "restore it" % key_file)
        os.replace(nxt, key_file)  # a crash before this: the next `switch` does it
    if command_key.load(key_file).kid.hex() != rot.new_kid:
        raise CommandKeyRotationError(409, "%s does not hold the new key %s"
                                      % (key_file, rot.new_kid))
    now = now or utcnow()
    rot.state = SWITCHED
    rot.switched_at = now
    rot.updated_at = now
    session.add(rot)
    return counted


def resend(session: Session, rot: CommandKeyRotation, signer: EcSigner, *, by: str,
           lim: FleetLimits, now: dt.datetime | None = None) -> Started:
    """Queue the statement again for devices with no ``ok`` and nothing pending, signed by
    ``signer`` (the old key: what a device that has not installed it trusts)."""
    now = now or utcnow()
    if signer.kid.hex() != rot.old_kid:
        raise CommandKeyRotationError(409, "trust-updates are signed by the old key %s"
                                      % rot.old_kid)
    if now >= rot.expires_at:
        raise CommandKeyRotationError(409, "the statement's window is over: announce a new "
                                      "one")
    states = device_states(session, rot)
    skip = {d for d, s in states.items() if s == CommandState.ok or s in PENDING_COMMANDS}
    done = Started(rot)
    _queue_all(session, rot, signer, by, lim, now, done, skip)
    return done


def of_fleet(session: Session, limit: int = 20) -> list[CommandKeyRotation]:
    return list(session.exec(select(CommandKeyRotation)
                             .order_by(col(CommandKeyRotation.id).desc()).limit(limit)))


def _root_signer(root_dir: Path, password_file: Path | None) -> EcSigner:
    """The root key as a signer; an encrypted one (``ca_custody``) opened with the
    passphrase in ``password_file``."""
    path = root_dir / ROOT_KEY
    if password_file is None:
        try:
            if not is_encrypted(path.read_bytes()):
                return load_signer(path)
        except OSError:
            return load_signer(path)  # its own message names the file
    custody = Custody(password_file=password_file)
    return EcSigner(load_key(path, custody.password, asked_from=str(
        password_file or "--root-password-file")))


@dataclass(frozen=True)
class Announced:
    statement: bytes
    version: int
    keys: list[tuple[bytes, int | None]]
    expires: int


def announce(root_dir: Path, new_point: bytes, *, old_point: bytes | None = None,
             keep_old_until: dt.datetime | None = None,
             valid_s: int = ANNOUNCE_VALID_DEFAULT_S, now: dt.datetime | None = None,
             root_password_file: Path | None = None) -> Announced:
    """The root's side, on the operator's machine: sign a statement listing ``new_point``
    (no end) and ``old_point`` until ``keep_old_until``, with the version after the last
    one this root signed (``VERSION_FILE`` beside the root key, written once the
    statement is made: a version is never signed twice)."""
    now = now or utcnow()
    if (old_point is None) != (keep_old_until is None):
        raise CommandKeyRotationError(422, "--keep-old-until and --old-key-pub go together: "
                                      "the old key is kept until that time")
    if keep_old_until is not None and keep_old_until <= now:
        raise CommandKeyRotationError(422, "--keep-old-until is in the past")
    if not 60 <= valid_s <= trust_statement.VALIDITY_MAX_S:
        raise CommandKeyRotationError(422, "the statement's window is 60..%d s"
                                      % trust_statement.VALIDITY_MAX_S)
    try:
        root = _root_signer(root_dir, root_password_file)
    except (KeyFileError, CaError) as e:
        raise CommandKeyRotationError(422, "%s (run this where the offline root is)" % e
                                      ) from e
    counter = root_dir / VERSION_FILE
    try:
        last = int(counter.read_text().strip()) if counter.exists() else 0
    except (OSError, ValueError) as e:
        raise CommandKeyRotationError(422, "%s is unreadable: %s" % (counter, e)) from e
    keys: list[tuple[bytes, int | None]] = [(new_point, None)]
    if old_point is not None and keep_old_until is not None:
        keys.append((old_point, int(keep_old_until.timestamp())))
    nbf = int(now.timestamp()) - 300  # backdated for clock skew, as certificates are
    try:
        data = trust_statement.encode_statement(root, root.kid, last + 1, keys, nbf,
                                                nbf + valid_s)
    except ValueError as e:
        raise CommandKeyRotationError(422, str(e)) from e
    write_atomic(counter, b"%d\n" % (last + 1), 0o600)
    return Announced(data, last + 1, keys, nbf + valid_s)
