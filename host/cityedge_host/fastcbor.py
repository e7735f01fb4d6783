"""C-backed decoding (``cbor2``) and a byte-layout COSE reader for CPython hot paths,
held to the core's rules.

The shared core's decoder is the reference. ``cbor2`` is much faster on CPython, but it
differs: 5.x ignores trailing bytes, accepts stray break bytes (``ff``, ``81ff``,
``a1ff00``), cannot tell the one-byte simple values ``e0``..``f3`` (valid) from the
ill-formed ``f800``..``f813``, turns many semantic tags into Python objects of its own and
has no item-count limit. So the fast path here only *accepts* what it can vouch for and
hands everything else to the core decoder, which then decides (accepts or raises):

- any ``cbor2`` error, a simple value, a break marker, an object cbor2 made from a
  semantic tag, a map key the core may judge differently: decoded again by the core;
- trailing bytes (found by asking cbor2 for one byte past the item): the core refuses;
- contents nested as deep as ``CBOR_MAX_DEPTH`` or deeper: decoded by the core (it counts
  the tags cbor2 unwraps, bignums too);
- more than ``CBOR_MAX_ITEMS`` items: input shorter than that cannot hold more (every item
  takes a byte); longer input is counted with an upper bound, and decoded by the core when
  the bound is over the limit.

Known differences, all inside bytes that must already carry a valid signature: cbor2
keeps the last of duplicate map keys (the core refuses duplicates), unwraps tags 25, 28,
29, 256 and 55799 to the plain values they wrap (the core keeps them as ``Tag``, which the
batch schema then refuses) and has no size limit on tag 2/3 bignums (the core's is 64
bytes). cityedge's encoder never produces any of these (``tests/core/test_fastcbor*.py``).

``decode_sign1`` reads the envelope cityedge devices send (tag 18, preferred heads,
empty unprotected map, 64-byte signature) straight from its bytes and slices the
Sig_structure from them; any other layout goes to the core's ``cose.decode_sign1``.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from cityedge_core import cbor, cose_decode, limits
from cityedge_core.errors import LimitError

_READ_SIZE = 4096  # bytes cbor2 reads ahead into its own buffer (cbor2 >= 5.8)
# cbor2's own nesting cap, above the core's: it only stops hostile input early (cbor2
# errors go to the core decoder, which applies the real limit)
_CBOR2_MAX_DEPTH = limits.CBOR_MAX_DEPTH + 4
_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))
_KEYS = frozenset((int, str, bytes, bool, float, type(None)))
# a container or tag this deep has contents at the core's depth limit: the core decides
_DEEP = limits.CBOR_MAX_DEPTH - 1
_MAX_ITEMS = limits.CBOR_MAX_ITEMS


class _Unsure(Exception):
    """cbor2's reading may differ from the core decoder's: the core decides."""


def loads(data: bytes, max_bytes: int = limits.BATCH_MAX_BYTES) -> Any:
    """``cityedge_core.cbor.loads(data, max_bytes)`` (core limits), faster."""
    if len(data) > max_bytes:
        raise LimitError("CBOR: input of %d bytes exceeds %d" % (len(data), max_bytes))
    try:
        obj = _decode(data)
        _check(obj, 0)
        if len(data) > _MAX_ITEMS and _bound(obj) > _MAX_ITEMS:
            raise _Unsure
    except _Unsure:
        return cbor.loads(data, max_bytes=max_bytes)
    return obj


def loads_batch_payload(data: bytes) -> Any:
    """``loads`` for a batch payload, checking each node once.

    The SenML records (key 7) that are maps are left to ``Batch.from_map``: it refuses a
    record holding anything but numbers, text, bytes and booleans (so also break markers,
    simple values, tags and containers), which the core refuses as well.
    """
    if len(data) > limits.BATCH_MAX_BYTES:
        raise LimitError("CBOR: input of %d bytes exceeds %d" % (len(data),
                                                                 limits.BATCH_MAX_BYTES))
    try:
        obj = _decode(data)
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
            if len(data) > _MAX_ITEMS and _payload_bound(obj) > _MAX_ITEMS:
                raise _Unsure
        else:
            _check(obj, 0)
            if len(data) > _MAX_ITEMS and _bound(obj) > _MAX_ITEMS:
                raise _Unsure
    except _Unsure:
        return cbor.loads(data, max_bytes=limits.BATCH_MAX_BYTES)
    return obj


def _decode(data: bytes) -> Any:
    # read_size: cbor2 reads ahead into its own buffer instead of calling ``fp.read`` once
    # per item (about twice as fast on a batch payload). The stream position then says
    # nothing about where the item ended, so trailing bytes are found by asking the
    # decoder for one more byte: only an exhausted input raises EOF.
    dec = cbor2.CBORDecoder(io.BytesIO(data), read_size=_READ_SIZE, max_depth=_CBOR2_MAX_DEPTH)
    try:
        obj = dec.decode()
    except Exception as e:
        # cbor2's own errors, and those of the semantic tags it decodes itself (TypeError,
        # ValueError, decimal.InvalidOperation ...): the core may judge the bytes otherwise
        raise _Unsure from e
    try:
        dec.read(1)
    except cbor2.CBORDecodeEOF:
        return obj
    raise _Unsure  # trailing bytes: the core words the error


def _check(obj: Any, depth: int) -> None:
    """Raise ``_Unsure`` for anything cbor2 may read otherwise (``obj`` sits at ``depth``).

    Containers and tags whose contents would reach the core's depth limit go to the core:
    it counts tags that cbor2 unwraps (a bignum is a tag around a byte string).
    """
    t = type(obj)
    if t is dict:
        if obj and depth >= _DEEP:
            raise _Unsure
        for k, v in obj.items():
            if type(k) not in _KEYS:
                _check_key(k)
            if type(v) not in _SCALARS:
                _check(v, depth + 1)
    elif t is list:
        if obj and depth >= _DEEP:
            raise _Unsure
        for v in obj:
            tv = type(v)
            if tv is dict and depth + 1 < _DEEP:
                for k, x in v.items():  # a SenML record: a flat map, checked inline
                    if type(k) not in _KEYS:
                        _check_key(k)
                    if type(x) not in _SCALARS:
                        _check(x, depth + 2)
            elif tv not in _SCALARS:
                _check(v, depth + 1)
    elif t is cbor2.CBORTag:
        if depth >= _DEEP:
            raise _Unsure
        _check(obj.value, depth + 1)
    elif t is cbor2.CBORSimpleValue:
        if obj.value < 32:  # e0..f3 (valid) or f800..f813 (not): cbor2 cannot tell
            raise _Unsure
    elif t not in _SCALARS and obj is not cbor2.undefined:
        raise _Unsure  # a break marker, or an object cbor2 made from a semantic tag


def _check_key(k: Any) -> None:
    if type(k) is cbor2.CBORTag:
        _check(k.value, 1)
        return
    raise _Unsure  # arrays and maps as keys (cbor2: tuple, FrozenDict), tag objects


def _bound(obj: Any) -> int:
    """At least the number of items the core decoder counts for ``obj`` (any integer may
    have been a tag 2/3 bignum: two items; a container may have ended with a break)."""
    t = type(obj)
    if t is int:
        return 2
    if t is dict:
        n = 2
        for k, v in obj.items():
            n += _bound(k) + _bound(v)
        return n
    if t is list:
        n = 2
        for v in obj:
            n += _bound(v)
        return n
    if t is cbor2.CBORTag:
        return 1 + _bound(obj.value)
    return 1


def _payload_bound(obj: dict[Any, Any]) -> int:
    """``_bound`` for a batch map, records counted without a walk: a record that
    ``Batch.from_map`` accepts holds scalar values, at most 2 items per key and value."""
    n = 2
    for k, v in obj.items():
        n += _bound(k)
        if k == 7 and type(v) is list and all(type(r) is dict for r in v):
            n += 2 + 2 * len(v) + 4 * sum(map(len, v))
        else:
            n += _bound(v)
    return n


# --- COSE_Sign1 as cityedge devices send it ------------------------------------------------

_TBS_HEAD = b"\x84\x6aSignature1"  # Sig_structure: array(4), "Signature1"
_MIN_SIGN1 = 2 + 1 + 1 + 1 + 2 + 64  # tag+array, empty protected, {}, empty payload, sig


def decode_sign1(data: Any) -> Any:
    """``cose.decode_sign1(data)`` (tagged, batch size limit): the same ``Sign1`` or error.

    The layout cityedge sends is read from the bytes; the protected header goes through
    the core's checks (cached per header). Anything else: the core's decoder.
    """
    if type(data) is bytes:
        msg = _sign1_layout(data)
        if msg is not None:
            return msg
    return cose_decode.decode_sign1(data)


def _sign1_layout(data: bytes) -> Any:
    """``d2 84 <bstr protected> a0 <bstr payload> 58 40 <64 bytes>`` with preferred
    (shortest) heads and nothing after it: the ``Sign1``, else None."""
    n = len(data)
    if n > limits.BATCH_MAX_BYTES or n < _MIN_SIGN1 or data[0] != 0xD2 or data[1] != 0x84:
        return None
    h = data[2]
    if 0x40 <= h <= 0x57:
        p0 = 3
        p1 = 3 + h - 0x40
    elif h == 0x58 and data[3] >= 24:
        p0 = 4
        p1 = 4 + data[3]
    else:
        return None
    if p1 + 4 > n or data[p1] != 0xA0:
        return None
    i = p1 + 1  # the payload's head
    h = data[i]
    if 0x40 <= h <= 0x57:
        q0 = i + 1
        q1 = q0 + h - 0x40
    elif h == 0x58 and data[i + 1] >= 24:
        q0 = i + 2
        q1 = q0 + data[i + 1]
    elif h == 0x59 and data[i + 1]:  # 256 bytes or more
        q0 = i + 3
        q1 = q0 + (data[i + 1] << 8 | data[i + 2])
    else:
        return None
    if q1 + 66 != n or data[q1] != 0x58 or data[q1 + 1] != 0x40:
        return None
    # preferred heads, so these slices are the Sig_structure's own encoding (RFC 9052 §4.4)
    tbs = b"".join((_TBS_HEAD, data[2:p1], b"\x40", data[i:q1]))
    return cose_decode.sign1_from_array(
        [data[p0:p1], {}, data[q0:q1], data[q1 + 2 :]], loads, tbs
    )
