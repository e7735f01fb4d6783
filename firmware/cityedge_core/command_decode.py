"""The decoding half of ``command``: a device's signed result, read by the fleet.

Format: ``command``'s docstring. Split from it so a device, which only encodes results,
does not carry this class on its heap. ``decode_result`` is the whole check; the ingest
runs its steps one by one between its acceptance rules (``open_result``, then the
signature with the key the kid names, then ``result_from_payload``). The rules, in order
(the first failure refuses):

1. a COSE_Sign1 in any form ``cose.decode_sign1`` accepts, at most ``RESULT_MAX_BYTES``,
   with a ``kid`` (byte string): ``MalformedError``;
2. the signature verifies with the key the caller found for that kid: ``SignatureError``;
3. the payload is one CBOR map (at most ``RESULT_MAX_ITEMS`` items,
   ``RESULT_MAX_DEPTH`` levels) with unsigned integer keys;
4. ``name`` passes ``command.check_name``; ``device`` is a device URN
   (``batch.check_device_id``); ``seq`` an integer in 0..``SEQ_MAX``; ``outcome`` one of
   ``ok``, ``refused``, ``failed``;
5. ``detail``, when present, is text of at most ``RESULT_DETAIL_MAX_CHARS``; ``data``,
   when present, encodes to at most ``RESULT_DATA_MAX_BYTES``.

Anything else is a ``MalformedError`` (``LimitError`` for a limit) naming the field. Unknown
keys are kept in ``Result.extra``. Whether the result answers a command of that device is
the receiver's question (``cityedge_fleet.acceptance``).
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, cose, limits
from .batch import check_device_id
from .command import (
    OUTCOMES,
    R_DATA,
    R_DETAIL,
    R_DEVICE,
    R_NAME,
    R_OUTCOME,
    R_SEQ,
    check_name,
)
from .errors import LimitError, MalformedError

_KNOWN = (R_NAME, R_DEVICE, R_SEQ, R_OUTCOME, R_DETAIL, R_DATA)


class Result:
    """A decoded result (the signed payload, not the envelope)."""

    def __init__(self, name: str, device: str, seq: int, outcome: str, detail: str = "",
                 data: Any = None, extra: Any = None) -> None:
        self.name = name
        self.device = device
        self.seq = seq
        self.outcome = outcome
        self.detail = detail
        self.data = data  # None: the device sent none
        self.extra = extra if extra is not None else {}

    def __repr__(self) -> str:
        return "Result(%s #%d of %s: %s)" % (self.name, self.seq, self.device, self.outcome)


def open_result(data: Any) -> Any:
    """Rule 1: the envelope (a ``cose_decode.Sign1``, not verified yet) with its kid."""
    msg = cose.decode_sign1(data, max_bytes=limits.RESULT_MAX_BYTES)
    if not isinstance(msg.kid, bytes) or not msg.kid:
        raise MalformedError("result: the envelope names no key (kid)")
    return msg


def result_from_payload(payload: Any) -> Result:
    """Rules 3-5: the result a verified payload holds."""
    obj = cbor.loads(payload, max_bytes=limits.RESULT_MAX_BYTES,
                     max_items=limits.RESULT_MAX_ITEMS, max_depth=limits.RESULT_MAX_DEPTH)
    if not isinstance(obj, dict):
        raise MalformedError("result: payload is not a map")
    for key in obj:
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise MalformedError("result: map keys must be unsigned integers")
    name = check_name(obj.get(R_NAME))
    device = obj.get(R_DEVICE)
    check_device_id(device)  # so it is text
    seq = obj.get(R_SEQ)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= limits.SEQ_MAX:
        raise MalformedError("result: seq (3) must be an integer in 0..%d" % limits.SEQ_MAX)
    outcome = obj.get(R_OUTCOME)
    if outcome not in OUTCOMES:
        raise MalformedError("result: outcome (4) must be ok, refused or failed")
    detail = obj.get(R_DETAIL, "")
    if not isinstance(detail, str):
        raise MalformedError("result: detail (5) must be text")
    if len(detail) > limits.RESULT_DETAIL_MAX_CHARS:
        raise LimitError("result: detail (5) over %d characters"
                         % limits.RESULT_DETAIL_MAX_CHARS)
    data = obj.get(R_DATA)
    if R_DATA in obj and len(cbor.dumps(data)) > limits.RESULT_DATA_MAX_BYTES:
        raise LimitError("result: data (6) over %d bytes" % limits.RESULT_DATA_MAX_BYTES)
    extra = {}
    for key in obj:
        if key not in _KNOWN:
            extra[key] = obj[key]
    return Result(name, str(device), seq, outcome, detail, data, extra)


def decode_result(data: Any, verifier: Any) -> Result:
    """Every rule: the result in ``data`` if ``verifier`` (the device's key) signed it."""
    msg = open_result(data)
    msg.verify(verifier)
    return result_from_payload(msg.payload)
