"""Fleet commands to a device: the one place that accepts or refuses them, on the
MicroPython device and on the Raspberry Pi gateway alike (``command`` is their format).

Commands arrive on ``ce/v1/<device>/down/cmd`` and the retained desired state on
``ce/v1/<device>/down/desired``. The broker is not trusted (a broker compromise must not
be enough to command a device), so every message must be a COSE_Sign1 (ES256) whose
payload is a CBOR map:

=====  ========  ==============================================================
key    name      value
=====  ========  ==============================================================
1      name      command name (text), e.g. ``"status"``; ``"desired"`` on down/desired
2      target    the device URN this command is for (exactly this device)
3      seq       fleet sequence number for this device, strictly increasing
4      expires   UNIX seconds after which the command is void
5      args      command arguments (any CBOR value; a map for ``desired``)
=====  ========  ==============================================================

``CommandGate.check`` applies, in order (first failure refuses, with the reason):

1. COSE_Sign1 in exactly the form the fleet's encoder writes (``cose.split_sign1``:
   tag 18, shortest heads, protected ``{alg: ES256, kid}``, nothing unprotected), at most
   ``MAX_COMMAND_BYTES``. Before the signature is checked the device parses nothing
   else: no general CBOR decoder sees unauthenticated bytes (and none is on its heap).
2. ``kid`` names a fleet key the device trusts; the signature verifies with it.
3. The payload is a map with the fields above; ``target`` equals this device's id.
4. ``expires`` is in the future by the device clock. A device without a trusted clock
   (no NTP yet) refuses commands unless ``require_clock`` is off; then ``seq`` alone
   protects it from replay.
5. ``seq`` is above the last accepted one (persisted in ``State`` key ``cmd_seq``), so a
   replayed or reordered command is refused; the same rule makes the retained
   ``desired`` message idempotent across reconnects.

Refusals raise ``SignatureError``/``UnknownKeyError`` (forged or foreign),
``MalformedError`` (shape), or ``CommandRefused`` (valid but not for now/us): all
``PeerError``, never fatal to the agent. A ``CommandRefused`` for this device carries the
command's ``name`` and ``seq`` (so it can be answered: the fleet re-sends a command until
it has an answer) and says whether it is a ``replay`` of a seq already taken (answered
again with the answer kept, not refused anew); one for another device carries neither.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


from . import cbor, cose
from .errors import MalformedError, PeerError, SignatureError, UnknownKeyError

MAX_COMMAND_BYTES = const(4096)  # bytes: largest signed command we decode (the core's
# limits.COMMAND_MAX_BYTES, held equal by the same test)

# payload keys, as ``cityedge_core.command`` defines them (private: the compiler folds
# them, no module attribute on the heap; tests/shared/test_command_shared.py holds them
# equal to the core's)
_C_NAME = const(1)
_C_TARGET = const(2)
_C_SEQ = const(3)
_C_EXPIRES = const(4)
_C_ARGS = const(5)


class CommandRefused(PeerError):
    """A well-formed, authentic command that is not for this device or not for now.

    ``name``/``seq``: the command's, when it is for this device (None otherwise);
    ``replay``: its seq was taken before (at or below the last accepted one)."""

    def __init__(self, msg: str, name: str | None = None, seq: int | None = None,
                 replay: bool = False) -> None:
        super().__init__(msg)
        self.name = name
        self.seq = seq
        self.replay = replay


class CommandGate:
    """Checks signed fleet commands for one device (rules in the module docstring).

    ``fleet_keys``: dict kid (bytes) -> verifier (``p256.PublicKey`` on the device), or
    anything with ``get(kid)`` (the CPython device's ``cityedge_host.fleet_trust``).
    ``state``: a ``store.State`` (or anything with ``get``/``set``) for ``cmd_seq``.
    ``clock``: callable returning UNIX seconds, or None when the device has no clock.
    """

    def __init__(self, device: str, fleet_keys: Any, state: Any,
                 clock: Any, require_clock: bool = True) -> None:
        self.device = device
        self.fleet_keys = fleet_keys
        self.state = state
        self.clock = clock
        self.require_clock = require_clock

    def check(self, data: bytes) -> tuple[str, int, Any]:
        """The accepted command as ``(name, seq, args)`` (a tuple: a class would cost the
        device heap), or a ``PeerError`` saying why not."""
        kid, protected, payload, sig = cose.split_sign1(data, MAX_COMMAND_BYTES)
        verifier = self.fleet_keys.get(kid)
        if verifier is None:
            raise UnknownKeyError("command: signed by unknown key %r" % (kid,))
        if not verifier.verify(cose.sig_structure(protected, payload), sig):
            raise SignatureError("command: signature does not verify")
        del protected, sig
        obj = cbor.loads(payload, max_bytes=MAX_COMMAND_BYTES)  # authentic from here on
        if not isinstance(obj, dict):
            raise MalformedError("command: payload is not a map")
        name = obj.get(_C_NAME)
        target = obj.get(_C_TARGET)
        seq = obj.get(_C_SEQ, -1)  # -1: absent, refused below like any non-uint
        expires = obj.get(_C_EXPIRES, -1)
        if not isinstance(name, str) or not isinstance(target, str):
            raise MalformedError("command: name and target must be text")
        if not _is_uint(seq) or not _is_uint(expires):
            raise MalformedError("command: seq and expires must be unsigned integers")
        if target != self.device:
            raise CommandRefused("command: for %s, not this device" % target)
        now = self.clock() if self.clock is not None else None
        if now is None:
            if self.require_clock:
                raise CommandRefused("command: no trusted clock yet to check its expiry",
                                     name, seq)
        elif now >= expires:
            raise CommandRefused("command: expired %d s ago" % (now - expires), name, seq)
        last = self.state.get("cmd_seq", 0)
        if seq <= last:
            raise CommandRefused("command: seq %d is not after %d (replay)" % (seq, last),
                                 name, seq, True)
        self.state.set(cmd_seq=seq)
        return name, seq, obj.get(_C_ARGS)


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0

