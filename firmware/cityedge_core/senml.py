"""SenML (RFC 8428): records in CBOR form, validation, and base-field resolution.

Records are dicts keyed by the SenML CBOR labels (RFC 8428 §6, Table 6): ``n=0 u=1 v=2
vs=3 vb=4 s=5 t=6 ut=7 vd=8 bver=-1 bn=-2 bt=-3 bu=-4 bv=-5 bs=-16``. ``from_json_names``
and ``to_json_names`` convert to and from the JSON field names.

``resolve`` applies base fields (§4.6): name = bn + n, time = bt + t, value = bv + v,
sum = bs + s, unit = u or bu; a resolved time below 2**28 is relative to ``now`` (§4.5.3).
Resolved records carry no base fields. Labels we do not know are kept (§4.4 allows new
fields; fields ending in ``_`` are "must understand" and rejected).
"""

import binascii

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import limits
from .errors import LimitError, MalformedError

BVER = -1
BN = -2
BT = -3
BU = -4
BV = -5
BS = -16
N = 0
U = 1
V = 2
VS = 3
VB = 4
S = 5
T = 6
UT = 7
VD = 8

JSON_LABELS = {
    "bver": BVER, "bn": BN, "bt": BT, "bu": BU, "bv": BV, "bs": BS,
    "n": N, "u": U, "v": V, "vs": VS, "vb": VB, "s": S, "t": T, "ut": UT, "vd": VD,
}  # fmt: skip
_NAMES = {}
for _k in JSON_LABELS:
    _NAMES[JSON_LABELS[_k]] = _k

_RELATIVE_LIMIT = 268435456  # 2**28 seconds: below it a time is relative (§4.5.3)
_NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_REST = _NAME_FIRST + "-:./_"


def _check_name(name: str) -> None:
    if not name or len(name) > limits.DEVICE_ID_MAX_CHARS + limits.SENML_NAME_MAX_CHARS:
        raise MalformedError("SenML: name empty or too long")
    if name[0] not in _NAME_FIRST:
        raise MalformedError("SenML: name %r must start with a letter or digit" % name)
    for ch in name:
        if ch not in _NAME_REST:
            raise MalformedError("SenML: name %r has character %r" % (name, ch))


_K_TEXT = 1
_K_NUMBER = 2
_K_BOOL = 3
_K_BYTES = 4
_K_VERSION = 5
_KINDS = {BN: _K_TEXT, BU: _K_TEXT, N: _K_TEXT, U: _K_TEXT, VS: _K_TEXT,
          BT: _K_NUMBER, BV: _K_NUMBER, BS: _K_NUMBER, V: _K_NUMBER, S: _K_NUMBER,
          T: _K_NUMBER, UT: _K_NUMBER, VB: _K_BOOL, VD: _K_BYTES, BVER: _K_VERSION}
_SCALAR_TYPES = (int, float, str, bytes, bool)


def validate_record(rec: Any) -> None:
    """Check one record's field types and limits (not the base-field resolution).

    Fields we do not know are kept, but their values must be scalars (number, text, bytes,
    boolean): a record stays one flat map.
    """
    if type(rec) is not dict:
        raise MalformedError("SenML: record is not a map")
    for key, val in rec.items():
        kind = _KINDS.get(key)
        tv = type(val)
        if kind == _K_NUMBER:
            if tv is not float and tv is not int:  # bool is not a number here
                raise MalformedError("SenML: field %s must be a number" % _NAMES[key])
        elif kind == _K_TEXT:
            if tv is not str:
                raise MalformedError("SenML: field %s must be text" % _NAMES[key])
            cap = limits.SENML_STRING_MAX_CHARS if key == VS else limits.DEVICE_ID_MAX_CHARS
            if len(val) > cap:
                raise LimitError("SenML: field %s longer than %d" % (_NAMES[key], cap))
        elif kind == _K_BOOL:
            if tv is not bool:
                raise MalformedError("SenML: field vb must be a boolean")
        elif kind == _K_BYTES:
            if tv is not bytes:
                raise MalformedError("SenML: field vd must be a byte string")
        elif kind == _K_VERSION:
            if tv is not int or val < 1:
                raise MalformedError("SenML: bver must be a positive integer")
        elif isinstance(key, str) and key.endswith("_"):
            raise MalformedError("SenML: must-understand field %r not supported" % key)
        elif not isinstance(key, (int, str)):
            raise MalformedError("SenML: label must be an integer or text")
        elif not isinstance(val, _SCALAR_TYPES):
            raise MalformedError("SenML: unknown field %r must hold a scalar" % (key,))


# labels whose values the one-loop check in ``validate_pack`` decides by itself (dicts:
# fast membership on both interpreters); every other label goes to ``validate_record``
_NUMBER_LABELS = {}
_TEXT_LABELS = {}
for _label in _KINDS:
    if _KINDS[_label] == _K_NUMBER:
        _NUMBER_LABELS[_label] = True
    elif _KINDS[_label] == _K_TEXT:
        _TEXT_LABELS[_label] = True
_SHORT_TEXT = min(limits.DEVICE_ID_MAX_CHARS, limits.SENML_STRING_MAX_CHARS)


def validate_pack(records: Any) -> None:
    """Check a whole pack: an array of valid records, within limits.

    One tight loop decides the common case: a number under a number label, text no
    longer than every text cap under a text label. A record with anything else goes
    through ``validate_record``, which applies every rule and words the error; a
    record the loop passes would pass ``validate_record`` too (each field is judged on
    its own there). This keeps a 50-record pack under 10 us on CPython.
    """
    if type(records) is not list:
        raise MalformedError("SenML: pack is not an array")
    if len(records) > limits.BATCH_MAX_RECORDS:
        raise LimitError("SenML: more than %d records" % limits.BATCH_MAX_RECORDS)
    numbers = _NUMBER_LABELS
    texts = _TEXT_LABELS
    cap = _SHORT_TEXT
    for rec in records:
        if type(rec) is not dict:
            raise MalformedError("SenML: record is not a map")
        for key, val in rec.items():
            t = type(val)
            if (t is float or t is int) and key in numbers:
                continue
            if t is str and key in texts and len(val) <= cap:
                continue
            validate_record(rec)
            break


def from_json_names(rec: dict[str, Any]) -> dict[Any, Any]:
    """Map a JSON-named record (``{"n": ..}``) to CBOR labels; unknown names are kept.

    ``vd`` is base64url text in SenML JSON (§5) and a byte string in CBOR.
    """
    out = {}
    for key in rec:
        val = rec[key]
        if key == "vd" and isinstance(val, str):
            val = _b64url_decode(val)
        out[JSON_LABELS.get(key, key)] = val
    return out


def to_json_names(rec: dict[Any, Any]) -> dict[Any, Any]:
    out = {}
    for key in rec:
        val = rec[key]
        if key == VD and isinstance(val, bytes):
            val = binascii.b2a_base64(val).decode().strip()
            val = val.replace("+", "-").replace("/", "_").rstrip("=")
        out[_NAMES.get(key, key)] = val
    return out


def _b64url_decode(text: str) -> bytes:
    text = text.replace("-", "+").replace("_", "/")
    try:
        return binascii.a2b_base64(text + "=" * (-len(text) % 4))
    except ValueError:
        raise MalformedError("SenML: vd is not base64url") from None


def resolve(records: Any, now: float = 0.0, validated: bool = False) -> list[dict[Any, Any]]:
    """Resolve base fields (RFC 8428 §4.6); returns new records keyed by CBOR labels.

    Each resolved record has a name, a time (absolute when the sum reaches 2**28, else
    ``now`` plus it), and at most one of the value fields. Raises ``MalformedError`` when
    a record has no name after resolution, or no value and no sum. ``validated=True``
    skips ``validate_pack`` for records that already passed it (``Batch.from_map`` does).
    """
    if not validated:
        validate_pack(records)
    bn = ""
    bt = 0
    bu = None
    bv = 0
    bs = 0
    out = []
    for rec in records:
        if BN in rec:
            bn = rec[BN]
        if BT in rec:
            bt = rec[BT]
        if BU in rec:
            bu = rec[BU]
        if BV in rec:
            bv = rec[BV]
        if BS in rec:
            bs = rec[BS]
        res = {}
        for key in rec:
            if key not in (BVER, BN, BT, BU, BV, BS, N, T, U, V, S):
                res[key] = rec[key]
        name = bn + rec.get(N, "")
        _check_name(name)
        res[N] = name
        t = bt + rec.get(T, 0)
        res[T] = t if t >= _RELATIVE_LIMIT else now + t
        unit = rec.get(U, bu)
        if unit is not None:
            res[U] = unit
        if V in rec:
            res[V] = bv + rec[V]
        elif BV in rec and not (VS in rec or VB in rec or VD in rec or S in rec):
            res[V] = bv
        if S in rec:
            res[S] = bs + rec[S]
        elif BS in rec and not (V in res or VS in rec or VB in rec or VD in rec):
            res[S] = bs
        nvals = 0
        for key in (V, VS, VB, VD):
            if key in res:
                nvals += 1
        if nvals > 1:
            raise MalformedError("SenML: record %r has more than one value" % name)
        if nvals == 0 and S not in res:
            raise MalformedError("SenML: record %r has no value and no sum" % name)
        out.append(res)
    return out
