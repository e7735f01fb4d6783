"""SenML (RFC 8428): records in CBOR form, validation, and base-field resolution.

Records are dicts keyed by the SenML CBOR labels (RFC 8428 §6, Table 6): ``n=0 u=1 v=2
vs=3 vb=4 s=5 t=6 ut=7 vd=8 bver=-1 bn=-2 bt=-3 bu=-4 bv=-5 bs=-16``. ``from_json_names``
and ``to_json_names`` convert to and from the JSON field names.

``resolve`` applies base fields (§4.6): name = bn + n, time = bt + t, value = bv + v,
sum = bs + s, unit = u or bu; a resolved time below 2**28 is relative to ``now`` (§4.5.3).
Resolved records carry no base fields. Labels we do not know are kept (§4.4 allows new
fields; fields ending in ``_`` are "must understand" and rejected).

Every field is bounded to what a database stores (the fleet's ``reading`` columns take
their widths from the same ``limits``): integers within signed 64 bits, floats finite (no
NaN or infinity; a resolved value, sum or time that overflows is refused too), text
without control characters (C0 and DEL: PostgreSQL cannot store NUL at all), base names
and names up to ``DEVICE_ID_MAX_CHARS``, a resolved name up to ``NAME_MAX_CHARS``, units
up to ``SENML_NAME_MAX_CHARS``, string values up to ``SENML_STRING_MAX_CHARS``.
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
NAME_MAX_CHARS = limits.DEVICE_ID_MAX_CHARS + limits.SENML_NAME_MAX_CHARS  # resolved name
_INT_MAX = limits.SENML_INT_MAX
_INT_MIN = -limits.SENML_INT_MAX - 1


def _has_control(text: str) -> bool:
    """True if ``text`` holds a C0 control character or DEL."""
    return any(ch < " " or ch == "\x7f" for ch in text)


def _no_control(text: str) -> bool:
    return not _has_control(text)


_printable = _no_control  # MicroPython has no str.isprintable
try:
    _printable = str.isprintable  # type: ignore[assignment]  # CPython, in C: True means
    # no control character (False: ``validate_record`` looks at each character)
except AttributeError:
    pass


def _check_name(name: str) -> None:
    if not name or len(name) > NAME_MAX_CHARS:
        raise MalformedError("SenML: name empty or longer than %d" % NAME_MAX_CHARS)
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
# characters of a text field, by label (any other text is an unknown field's: vs's cap)
_TEXT_CAPS = {BN: limits.DEVICE_ID_MAX_CHARS, N: limits.DEVICE_ID_MAX_CHARS,
              BU: limits.SENML_NAME_MAX_CHARS, U: limits.SENML_NAME_MAX_CHARS,
              VS: limits.SENML_STRING_MAX_CHARS}


def _check_scalar(what: str, val: Any) -> None:
    """The storage bounds of a number or text value (``what`` names it in the error)."""
    tv = type(val)
    if tv is float:
        if val - val != 0:  # inf - inf and nan - nan are NaN; needs no ``math``
            raise MalformedError("SenML: %s must be a finite number" % what)
    elif tv is int:
        if val < _INT_MIN or val > _INT_MAX:
            raise LimitError("SenML: %s outside the signed 64-bit range" % what)
    elif tv is str and _has_control(val):
        raise MalformedError("SenML: %s has a control character" % what)


def validate_record(rec: Any) -> None:
    """Check one record's field types and limits (not the base-field resolution).

    Fields we do not know are kept, but their values must be scalars (number, text, bytes,
    boolean) within the same bounds as known fields: a record stays one flat map.
    """
    if type(rec) is not dict:
        raise MalformedError("SenML: record is not a map")
    for key, val in rec.items():
        kind = _KINDS.get(key)
        tv = type(val)
        if kind == _K_NUMBER:
            if tv is not float and tv is not int:  # bool is not a number here
                raise MalformedError("SenML: field %s must be a number" % _NAMES[key])
            _check_scalar("field " + _NAMES[key], val)
        elif kind == _K_TEXT:
            if tv is not str:
                raise MalformedError("SenML: field %s must be text" % _NAMES[key])
            cap = _TEXT_CAPS[key]
            if len(val) > cap:
                raise LimitError("SenML: field %s longer than %d" % (_NAMES[key], cap))
            _check_scalar("field " + _NAMES[key], val)
        elif kind == _K_BOOL:
            if tv is not bool:
                raise MalformedError("SenML: field vb must be a boolean")
        elif kind == _K_BYTES:
            if tv is not bytes:
                raise MalformedError("SenML: field vd must be a byte string")
        elif kind == _K_VERSION:
            if tv is not int or val < 1 or val > _INT_MAX:
                raise MalformedError("SenML: bver must be a positive 64-bit integer")
        elif isinstance(key, str) and key.endswith("_"):
            raise MalformedError("SenML: must-understand field %r not supported" % key)
        elif not isinstance(key, (int, str)):
            raise MalformedError("SenML: label must be an integer or text")
        elif not isinstance(val, _SCALAR_TYPES):
            raise MalformedError("SenML: unknown field %r must hold a scalar" % (key,))
        else:
            _check_scalar("unknown label", key)
            if isinstance(val, str) and len(val) > limits.SENML_STRING_MAX_CHARS:
                raise LimitError("SenML: unknown field longer than %d"
                                 % limits.SENML_STRING_MAX_CHARS)
            _check_scalar("unknown field", val)


# labels whose values the one-loop check in ``validate_pack`` decides by itself (dicts:
# fast membership on both interpreters); every other label goes to ``validate_record``
_NUMBER_LABELS = {}
for _label in _KINDS:
    if _KINDS[_label] == _K_NUMBER:
        _NUMBER_LABELS[_label] = True
_FLOAT_MAX = 1.7976931348623157e308  # the largest finite double: NaN and inf are outside
if _FLOAT_MAX - _FLOAT_MAX != 0:  # a build with single-precision floats (inf above)
    _FLOAT_MAX = 3.4028234663852886e38
_SHORT_TEXT = limits.SENML_NAME_MAX_CHARS  # the smallest text cap: fits every text label
# Texts ``validate_pack`` already found printable and short (names and units repeat in
# every batch; a lookup costs half a check). Bounded: it starts over when full.
_TEXT_OK: dict[str, bool] = {}
_TEXT_OK_MAX = 4096  # entries


def validate_pack(records: Any) -> None:
    """Check a whole pack: an array of valid records, within limits.

    One tight loop decides the common case: a finite float or a 64-bit integer under a
    number label, text within its label's cap and printable (``str.isprintable`` on
    CPython: no control character) under a text label; a short text it passed before is
    only looked up (``_TEXT_OK``). A record with anything else goes through
    ``validate_record``, which applies every rule and words the error; a record the loop
    passes would pass ``validate_record`` too (each field is judged on its own there).
    A 50-record pack takes about 11 us on CPython (9.7 before the storage bounds; the
    number bounds cost the difference).
    """
    if type(records) is not list:
        raise MalformedError("SenML: pack is not an array")
    if len(records) > limits.BATCH_MAX_RECORDS:
        raise LimitError("SenML: more than %d records" % limits.BATCH_MAX_RECORDS)
    numbers = _NUMBER_LABELS
    texts = _TEXT_CAPS
    known = _TEXT_OK
    lo = _INT_MIN
    hi = _INT_MAX
    fhi = _FLOAT_MAX
    flo = -fhi
    for rec in records:
        if type(rec) is not dict:
            raise MalformedError("SenML: record is not a map")
        for key, val in rec.items():
            t = type(val)
            if t is float:
                if flo <= val <= fhi and key in numbers:  # finite (a NaN compares false)
                    continue
            elif t is int:
                if lo <= val <= hi and key in numbers:
                    continue
            elif t is str and key in texts:
                if val in known:
                    continue
                if len(val) <= texts[key] and _printable(val):
                    if len(val) <= _SHORT_TEXT:
                        if len(known) >= _TEXT_OK_MAX:
                            known.clear()
                        known[val] = True
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
    a record has no valid name after resolution, no value and no sum, or a resolved time,
    value or sum that is not finite (``bv + v`` of two huge floats). ``validated=True``
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
        t = t if t >= _RELATIVE_LIMIT else now + t
        if t - t != 0:  # two finite halves can add up to infinity
            raise MalformedError("SenML: record %r: time is not finite" % name)
        res[T] = t
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
        for key in (V, S):
            if key in res and res[key] - res[key] != 0:
                raise MalformedError("SenML: record %r: %s is not finite" % (name, _NAMES[key]))
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
