"""Trust statements: the offline root's word on which fleet command keys a device obeys.

A stolen fleet server holds the command key, so a command signed by that key alone must
not be able to change which keys a device trusts: otherwise the thief installs a key of
its own and keeps the fleet after the theft is noticed. The fleet's key set is therefore
changed only by a **statement** the offline root signs (its key never reaches the fleet
server), delivered to a device *inside* a ``trust-update`` command that the current
command key signs and the device's gate checks first. A change needs both keys.

The statement is a COSE_Sign1 (ES256; ``kid`` = ``cose.kid_for_public_key`` of the root's
SEC1 point; external AAD ``STATEMENT_AAD``), at most ``STATEMENT_MAX_BYTES``, whose
payload is a CBOR map with exactly these keys:

=====  ===========  ===========================================================
key    name         value
=====  ===========  ===========================================================
1      purpose      ``PURPOSE_COMMAND_KEYS`` (text): what the keys may sign
2      version      1..``VERSION_MAX``; a device takes only a version above the
                    one it holds (no rollback to a set that lists a stolen key)
3      keys         1..``KEYS_MAX`` entries ``{1: point, 2: until}``: the
                    *complete* set (replace semantics); ``point`` the key's
                    65-byte uncompressed SEC1 point (distinct), ``until``
                    (optional) UNIX seconds from which it is no longer
                    trusted (the overlap of an old key); at least one key has
                    no ``until``, so a set never runs out by itself
4      not_before   UNIX seconds before which the statement is not taken
5      expires      UNIX seconds from which it is not taken any more;
                    ``expires - not_before`` is 1..``VALIDITY_MAX_S``
=====  ===========  ===========================================================

``check_statement`` is the one place that accepts one. Its rules, in order (the first
failure refuses):

1. at most ``STATEMENT_MAX_BYTES``; a COSE_Sign1 in any form ``cose.decode_sign1`` takes,
   with a kid: ``MalformedError`` (``LimitError`` for the size);
2. the kid is the root's: ``UnknownKeyError`` (a statement by any other key, a fleet
   command key included, is not the root's word);
3. the signature verifies with the root key and ``STATEMENT_AAD``: ``SignatureError``;
4. the payload has exactly the keys above with their types and limits, and the purpose is
   ``PURPOSE_COMMAND_KEYS``: ``MalformedError`` naming the field;
5. ``not_before <= now < expires``: ``StatementRefused`` (not yet valid, expired);
6. ``version`` is above the version held: ``StatementRefused`` with ``rollback`` set.

The validity window limits *installing* a statement. Once installed, its keys stay
trusted (each until its ``until``) until a later statement replaces them: an installed
trust store never expires by itself, or a device that misses a rotation would lose its
fleet. No unknown keys are kept: a new format is a new purpose and a new AAD.

Heap: the firmware agent does not load this module today (the Pi gateway does); it imports
only the core and is held to MicroPython by ``tests/shared/test_trust_statement_shared.py``.
Measured on the unix port (64-bit, ``-X heapsize=64k``, from ``.mpy``, ``gc.mem_alloc``
after a collection): importing it costs 7.3 KiB beside ``cbor``/``cose``/``p256``; checking
a two-key statement (276 bytes; four keys: 409) keeps 13 KiB (``cose_decode`` loaded, the
statement, the root key) and takes about 50 ms of pure-Python ES256 on this host.
CPython (``cryptography``): 0.39 ms per ``check_statement``.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, cose
from .errors import LimitError, MalformedError, PeerError, UnknownKeyError

STATEMENT_MAX_BYTES = 1024  # bytes: a whole signed statement (four keys: about 450);
# it travels in a command's arguments (limits.COMMAND_ARGS_MAX_BYTES) with room to spare
KEYS_MAX = 4  # keys in one statement (a rollover overlaps two; the gateway's
# FLEET_KEYS_MAX is the same)
VERSION_MAX = 0xFFFFFFFFFFFF  # largest version (48 bits, as a seq)
TIME_MAX = 0xFFFFFFFFFF  # largest UNIX time in a statement (40 bits: year 36812)
VALIDITY_MAX_S = 366 * 86400  # seconds: longest window a statement may be installed in
POINT_BYTES = 65  # an uncompressed SEC1 P-256 point: 0x04 || x || y

PURPOSE_COMMAND_KEYS = "cityedge fleet command keys"
STATEMENT_AAD = b"cityedge trust statement v1"  # external AAD (COSE Sig_structure): a
# signature the root makes for anything else can never pass as a statement

TRUST_UPDATE = "trust-update"  # the command that carries a statement
A_STATEMENT = 1  # its argument: {1: statement bytes}

# payload keys
S_PURPOSE = 1
S_VERSION = 2
S_KEYS = 3
S_NOT_BEFORE = 4
S_EXPIRES = 5
_KNOWN = (S_PURPOSE, S_VERSION, S_KEYS, S_NOT_BEFORE, S_EXPIRES)
# a key entry's keys
K_POINT = 1
K_UNTIL = 2


class StatementRefused(PeerError):
    """An authentic, well-formed statement that is not for now: not yet valid, expired,
    or (``rollback``) not newer than the one held."""

    def __init__(self, msg: str, rollback: bool = False) -> None:
        super().__init__(msg)
        self.rollback = rollback


class TrustStatement:
    """A checked statement: ``keys`` is a list of ``(point, until)`` (until None: no end)."""

    def __init__(self, purpose: str, version: int, keys: Any, not_before: int,
                 expires: int) -> None:
        self.purpose = purpose
        self.version = version
        self.keys = keys
        self.not_before = not_before
        self.expires = expires

    def points_at(self, now: Any) -> list[bytes]:
        """The points trusted at UNIX time ``now`` (None: no clock; then a key with an
        end is not trusted, since nothing shows its overlap is still running)."""
        out = []
        for point, until in self.keys:
            if until is None or (now is not None and now < until):
                out.append(point)
        return out

    def __repr__(self) -> str:
        return "TrustStatement(v%d, %d keys)" % (self.version, len(self.keys))


def _uint(v: Any, top: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top


def check_point(point: Any) -> bytes:
    """A 65-byte uncompressed SEC1 point (the curve check is the verifier's)."""
    if not isinstance(point, bytes) or len(point) != POINT_BYTES or point[0] != 4:
        raise MalformedError("statement: a key must be a 65-byte uncompressed point")
    return point


def _keys(entries: Any) -> Any:
    if not isinstance(entries, list) or not entries:
        raise MalformedError("statement: keys (3) must be a non-empty array")
    if len(entries) > KEYS_MAX:
        raise LimitError("statement: %d keys, at most %d" % (len(entries), KEYS_MAX))
    out = []
    seen = []
    lasting = False
    for entry in entries:
        if not isinstance(entry, dict) or K_POINT not in entry:
            raise MalformedError("statement: a key entry must be a map with a point (1)")
        for k in entry:
            if k not in (K_POINT, K_UNTIL) or isinstance(k, bool):
                raise MalformedError("statement: a key entry has a key it must not have")
        point = check_point(entry[K_POINT])
        if point in seen:
            raise MalformedError("statement: a key is listed twice")
        seen.append(point)
        until = entry.get(K_UNTIL)
        if K_UNTIL in entry and not _uint(until, TIME_MAX):
            raise MalformedError("statement: a key's until (2) must be UNIX seconds")
        lasting = lasting or until is None
        out.append((point, until))
    if not lasting:
        raise MalformedError("statement: every key has an end; at least one must not")
    return out


def statement_from_payload(payload: Any) -> TrustStatement:
    """Rule 4: the statement a verified payload holds."""
    obj = cbor.loads(payload, max_bytes=STATEMENT_MAX_BYTES, max_items=64, max_depth=3)
    if not isinstance(obj, dict):
        raise MalformedError("statement: payload is not a map")
    for key in obj:
        if key not in _KNOWN or isinstance(key, bool):
            raise MalformedError("statement: payload has a key it must not have")
    for key in _KNOWN:
        if key not in obj:
            raise MalformedError("statement: payload lacks key %d" % key)
    purpose = obj[S_PURPOSE]
    if purpose != PURPOSE_COMMAND_KEYS:
        raise MalformedError("statement: purpose (1) is not %r" % PURPOSE_COMMAND_KEYS)
    version = obj[S_VERSION]
    if not _uint(version, VERSION_MAX) or version == 0:
        raise MalformedError("statement: version (2) must be in 1..%d" % VERSION_MAX)
    keys = _keys(obj[S_KEYS])
    nbf = obj[S_NOT_BEFORE]
    exp = obj[S_EXPIRES]
    if not _uint(nbf, TIME_MAX) or not _uint(exp, TIME_MAX):
        raise MalformedError("statement: not_before (4) and expires (5) must be UNIX seconds")
    if not 0 < exp - nbf <= VALIDITY_MAX_S:
        raise MalformedError("statement: expires (5) must be 1..%d s after not_before (4)"
                             % VALIDITY_MAX_S)
    return TrustStatement(purpose, version, keys, nbf, exp)


def open_statement(data: Any) -> Any:
    """Rule 1: the envelope (a ``cose_decode.Sign1``, not verified yet) with its kid."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedError("statement: not bytes")
    if len(data) > STATEMENT_MAX_BYTES:
        raise LimitError("statement: %d bytes, at most %d" % (len(data), STATEMENT_MAX_BYTES))
    try:
        msg = cose.decode_sign1(bytes(data), max_bytes=STATEMENT_MAX_BYTES)
    except MalformedError as e:  # say what was being read: "CBOR: ..." alone is unclear
        raise type(e)("statement: not a COSE_Sign1 (%s)" % e) from None
    if not isinstance(msg.kid, bytes) or not msg.kid:
        raise MalformedError("statement: the envelope names no key (kid)")
    return msg


def check_statement(data: Any, root: Any, root_kid: bytes, held_version: int,
                    now: Any) -> TrustStatement:
    """Every rule: the statement in ``data`` if the root (``root``: a verifier, whose kid is
    ``root_kid``) signed it, it is valid at ``now`` (UNIX seconds; None: no trusted clock,
    refused) and newer than ``held_version``."""
    msg = open_statement(data)
    if msg.kid != root_kid:
        raise UnknownKeyError("statement: signed by key %s, not by the root %s"
                              % (_hex(msg.kid), _hex(root_kid)))
    msg.verify(root, STATEMENT_AAD)
    st = statement_from_payload(msg.payload)
    if now is None:
        raise StatementRefused("statement: no trusted clock to check its validity")
    if now < st.not_before:
        raise StatementRefused("statement: not valid before %d (%d s from now)"
                               % (st.not_before, st.not_before - now))
    if now >= st.expires:
        raise StatementRefused("statement: expired %d s ago" % (now - st.expires))
    if st.version <= held_version:
        raise StatementRefused("statement: version %d is not after the %d held (replay or "
                               "rollback)" % (st.version, held_version), True)
    return st


def read_installed(data: Any, root: Any, root_kid: bytes) -> TrustStatement:
    """A statement this device installed earlier (rules 1-4; its window is not checked
    again: an installed trust store does not expire)."""
    msg = open_statement(data)
    if msg.kid != root_kid:
        raise UnknownKeyError("statement: the installed one is not the root's")
    msg.verify(root, STATEMENT_AAD)
    return statement_from_payload(msg.payload)


def encode_statement(signer: Any, kid: bytes, version: int, keys: Any, not_before: int,
                     expires: int) -> bytes:
    """Sign a statement with the root (``keys``: ``(point, until or None)`` pairs).
    ValueError when it would not pass ``statement_from_payload``."""
    entries = []
    for point, until in keys:
        entry = {K_POINT: bytes(point)}
        if until is not None:
            entry[K_UNTIL] = until
        entries.append(entry)
    payload = cbor.dumps({S_PURPOSE: PURPOSE_COMMAND_KEYS, S_VERSION: version,
                          S_KEYS: entries, S_NOT_BEFORE: not_before, S_EXPIRES: expires})
    try:
        statement_from_payload(payload)
    except MalformedError as e:
        raise ValueError(str(e)) from None
    data = cose.encode_sign1(payload, signer, kid, STATEMENT_AAD)
    if len(data) > STATEMENT_MAX_BYTES:
        raise ValueError("statement: %d bytes, at most %d" % (len(data), STATEMENT_MAX_BYTES))
    return data


def trust_update_args(args: Any) -> bytes:
    """The statement a ``trust-update`` command's arguments carry (MalformedError if none)."""
    if not isinstance(args, dict):
        raise MalformedError("trust-update: the arguments are not a map")
    data = args.get(A_STATEMENT)
    if not isinstance(data, bytes) or not data:
        raise MalformedError("trust-update: the statement (1) must be bytes")
    if len(data) > STATEMENT_MAX_BYTES:
        raise LimitError("trust-update: statement over %d bytes" % STATEMENT_MAX_BYTES)
    return data


def _hex(b: Any) -> str:
    try:
        return bytes(b).hex()
    except (TypeError, ValueError):
        return repr(b)
