"""A C-backed CBOR decoder (``cbor2``) for CPython hot paths, held to the core's rules.

The shared core's decoder is the reference. ``cbor2`` is much faster on CPython, but 5.x
ignores trailing bytes, accepts stray break bytes (``ff``, ``81ff``, ``a1ff00``) and
two-byte simple values below 32 (RFC 8949 §3.3 says not well-formed). ``loads`` rejects
trailing bytes itself and walks the result once (``_check``), refusing break markers, low
simple values, nesting deeper than the core allows and map keys the core would refuse.
The batch payload goes through here only after its signature verified; the COSE envelope
and protected header go through here too. One deliberate difference remains: the fast
path refuses every simple value below 32, also the valid one-byte form ``e0``..``f3``
that the core accepts, because cbor2 cannot tell it from the ill-formed ``f800``..``f813``;
cityedge never sends simple values (``test_the_one_documented_difference...``).
``tests/core/test_fastcbor.py`` checks that core and fast path agree on every vector, on
every batch, and on generated inputs.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from cityedge_core import limits
from cityedge_core.errors import LimitError, MalformedError


def loads_batch_payload(data: bytes) -> Any:
    """``loads`` for a batch payload, checking each node once.

    The SenML records (key 7) are left to ``Batch.from_map``, which type-checks every field
    of every record (unknown fields must be scalars), so a break marker or simple value in
    a record is refused there; everything else is checked here.
    """
    obj = _decode(data, limits.BATCH_MAX_BYTES)
    if type(obj) is dict:
        for k, v in obj.items():
            if type(k) not in _KEYS:
                _check_key(k)
            if k == 7 and type(v) is list:
                for rec in v:
                    if type(rec) is not dict:
                        _check(rec, 2)
            elif type(v) not in _SCALARS:
                _check(v, 1)
    else:
        _check(obj, 0)
    return obj


def loads(data: bytes, max_bytes: int = limits.BATCH_MAX_BYTES) -> Any:
    """Decode exactly one CBOR item like ``cityedge_core.cbor.loads`` does, faster."""
    obj = _decode(data, max_bytes)
    _check(obj, 0)
    return obj


def _decode(data: bytes, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise LimitError("CBOR: input of %d bytes exceeds %d" % (len(data), max_bytes))
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, RecursionError) as e:
        raise MalformedError("CBOR: %s" % e) from e
    except Exception as e:
        # cbor2 decodes semantic tags (decimal fractions, bigfloats, dates, ...) itself and
        # lets their own errors out (TypeError, ValueError, decimal.InvalidOperation): all
        # of them are malformed input here
        raise MalformedError("CBOR: %s: %s" % (type(e).__name__, e)) from e
    if fp.tell() != len(data):
        raise MalformedError("CBOR: %d trailing bytes after the item" % (len(data) - fp.tell()))
    return obj


_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))
_KEYS = frozenset((int, str, bytes, bool, float, type(None)))


def _check(obj: Any, depth: int) -> None:
    """Refuse what the core's decoder refuses but cbor2 5.x lets through."""
    if depth > limits.CBOR_MAX_DEPTH:
        raise LimitError("CBOR: nested deeper than %d" % limits.CBOR_MAX_DEPTH)
    t = type(obj)
    if t is dict:
        for k, v in obj.items():
            if type(k) not in _KEYS:
                _check_key(k)
            if type(v) not in _SCALARS:
                _check(v, depth + 1)
    elif t is list:
        for v in obj:
            tv = type(v)
            if tv is dict:  # a SenML record: a flat map, checked inline (the hot path)
                for k, x in v.items():
                    if type(k) not in _KEYS:
                        _check_key(k)
                    if type(x) not in _SCALARS:
                        _check(x, depth + 2)
            elif tv not in _SCALARS:
                _check(v, depth + 1)
    elif t is cbor2.CBORTag:
        _check(obj.value, depth + 1)
    elif t is cbor2.CBORSimpleValue:
        if obj.value < 32:  # cbor2 cannot tell e0 (valid) from f800 (not); batches use neither
            raise MalformedError("CBOR: simple value %d refused on the fast path" % obj.value)
    elif t not in _SCALARS and obj is not cbor2.undefined:
        raise MalformedError("CBOR: not well-formed (%s)" % t.__name__)


def _check_key(k: Any) -> None:
    if isinstance(k, cbor2.CBORTag):
        _check(k.value, 1)
        return
    raise MalformedError("CBOR: map key of type %s not supported" % type(k).__name__)
