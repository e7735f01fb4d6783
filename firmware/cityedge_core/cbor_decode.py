"""CBOR decoding (RFC 8949): the strict, bounded half of ``cbor``.

Kept in its own module so that a device which only signs never loads it (every module
costs heap on MicroPython when it is not frozen). Use it through ``cbor.loads`` and
``cbor.decode_prefix``; the rules are in ``cbor``'s docstring.
"""

import struct

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


from .cbor import _FLOAT_INF
from .errors import LimitError, MalformedError

# limits (``limits``) as private consts: the compiler folds them, and the device
# never loads ``limits`` (its names would be interned: "Memory on the device");
# tests/core/test_limit_copies.py holds them equal to ``limits``
_CBOR_MAX_BYTES = const(65536)
_CBOR_MAX_DEPTH = const(16)
_CBOR_MAX_ITEMS = const(4096)
_CBOR_MAX_STRING = const(16384)
_CBOR_MAX_BIGNUM_BYTES = const(64)

_BREAK = object()


def _types() -> Any:
    """``cbor_types``, loaded when a tag or simple value first turns up (a device's own
    state and commands never hold one)."""
    from . import cbor_types

    return cbor_types


def _half_to_float(h: int) -> float:
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        val = mant * 2.0**-24
    elif exp == 31:
        val = _FLOAT_INF if mant == 0 else float("nan")
    else:
        val = (mant + 1024) * 2.0 ** (exp - 25)
    return -val if h & 0x8000 else val


class _Decoder:
    def __init__(self, data: Any, max_depth: int, max_items: int, max_string: int) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.items = 0
        self.max_depth = max_depth
        self.max_items = max_items
        self.max_string = max_string

    def _take(self, n: int) -> Any:
        p = self.pos
        if n > self.end - p:
            raise MalformedError("CBOR: truncated at byte %d (need %d more)" % (p, n))
        self.pos = p + n
        return self.data[p : p + n]

    def _arg(self, ai: int) -> int:
        if ai < 24:
            return ai
        if ai == 24:
            n: int = self._take(1)[0]
        elif ai == 25:
            n = struct.unpack(">H", self._take(2))[0]
        elif ai == 26:
            n = struct.unpack(">I", self._take(4))[0]
        elif ai == 27:
            n = struct.unpack(">Q", self._take(8))[0]
        else:
            raise MalformedError("CBOR: reserved additional information %d" % ai)
        return n

    def _count(self, n: int) -> None:
        self.items += n
        if self.items > self.max_items:
            raise LimitError("CBOR: more than %d data items" % self.max_items)

    def _string(self, major: int, ai: int) -> Any:
        if ai == 31:
            chunks = []
            total = 0
            while True:
                if self.pos >= self.end:
                    raise MalformedError("CBOR: truncated indefinite-length string")
                ib = self.data[self.pos]
                self.pos += 1
                if ib == 0xFF:
                    break
                if ib >> 5 != major or ib & 0x1F == 31:
                    raise MalformedError("CBOR: bad chunk in indefinite-length string")
                n = self._arg(ib & 0x1F)
                total += n
                if total > self.max_string:
                    raise LimitError("CBOR: string longer than %d bytes" % self.max_string)
                chunks.append(self._string_body(major, n))
            if major == 2:
                return b"".join(chunks)
            return "".join(chunks)
        n = self._arg(ai)
        if n > self.max_string:
            raise LimitError("CBOR: string longer than %d bytes" % self.max_string)
        return self._string_body(major, n)

    def _string_body(self, major: int, n: int) -> Any:
        raw = bytes(self._take(n))
        if major == 2:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeError:
            raise MalformedError("CBOR: text string is not valid UTF-8") from None

    def item(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise LimitError("CBOR: nested deeper than %d" % self.max_depth)
        if self.pos >= self.end:
            raise MalformedError("CBOR: truncated at byte %d" % self.pos)
        ib = self.data[self.pos]
        self.pos += 1
        self._count(1)
        major = ib >> 5
        ai = ib & 0x1F
        if major == 0:
            return self._arg(ai)
        if major == 1:
            return -1 - self._arg(ai)
        if major == 2 or major == 3:
            return self._string(major, ai)
        if major == 4:
            if ai == 31:
                out: list[Any] = []
                while True:
                    v = self.item(depth + 1)
                    if v is _BREAK:
                        return out
                    out.append(v)
            n = self._arg(ai)
            if n > self.end - self.pos:
                raise MalformedError("CBOR: array of %d items cannot fit in the input" % n)
            return [self._value(depth + 1) for _ in range(n)]
        if major == 5:
            out_map: dict[Any, Any] = {}
            if ai == 31:
                while True:
                    k = self.item(depth + 1)
                    if k is _BREAK:
                        return out_map
                    self._map_put(out_map, k, self._value(depth + 1))
            n = self._arg(ai)
            if 2 * n > self.end - self.pos:
                raise MalformedError("CBOR: map of %d pairs cannot fit in the input" % n)
            for _ in range(n):
                k = self._value(depth + 1)
                self._map_put(out_map, k, self._value(depth + 1))
            return out_map
        if major == 6:
            tag = self._arg(ai)
            value = self._value(depth + 1)
            if tag == 2 or tag == 3:
                if not isinstance(value, bytes):
                    raise MalformedError("CBOR: bignum tag %d must wrap a byte string" % tag)
                if len(value) > _CBOR_MAX_BIGNUM_BYTES:
                    raise LimitError("CBOR: bignum longer than %d bytes" % len(value))
                mag = int.from_bytes(value, "big") if value else 0
                return mag if tag == 2 else -1 - mag
            return _types().Tag(tag, value)
        # major 7
        if ai < 20:
            return _types().Simple(ai)
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        if ai == 23:
            return _types().UNDEFINED
        if ai == 24:
            v = self._take(1)[0]
            if v < 32:
                raise MalformedError("CBOR: two-byte simple value %d below 32" % v)
            return _types().Simple(v)
        if ai == 25:
            return _half_to_float(struct.unpack(">H", self._take(2))[0])
        if ai == 26:
            return struct.unpack(">f", self._take(4))[0]
        if ai == 27:
            return struct.unpack(">d", self._take(8))[0]
        if ai == 31:
            return _BREAK
        raise MalformedError("CBOR: reserved additional information %d" % ai)

    def _value(self, depth: int) -> Any:
        v = self.item(depth)
        if v is _BREAK:
            raise MalformedError("CBOR: break outside an indefinite-length item")
        return v

    def _map_put(self, m: dict[Any, Any], k: Any, v: Any) -> None:
        if isinstance(k, (list, dict)):
            raise MalformedError("CBOR: map key is an array or map (unsupported)")
        if k in m:
            raise MalformedError("CBOR: duplicate map key %r" % (k,))
        m[k] = v


def loads(
    data: Any,
    max_bytes: int = _CBOR_MAX_BYTES,
    max_depth: int = _CBOR_MAX_DEPTH,
    max_items: int = _CBOR_MAX_ITEMS,
    max_string: int = _CBOR_MAX_STRING,
) -> Any:
    """Decode exactly one CBOR item from ``data``; trailing bytes are an error."""
    obj, end = decode_prefix(data, max_bytes, max_depth, max_items, max_string)
    if end != len(data):
        raise MalformedError("CBOR: %d trailing bytes after the item" % (len(data) - end))
    return obj


def decode_prefix(
    data: Any,
    max_bytes: int = _CBOR_MAX_BYTES,
    max_depth: int = _CBOR_MAX_DEPTH,
    max_items: int = _CBOR_MAX_ITEMS,
    max_string: int = _CBOR_MAX_STRING,
) -> Any:
    """Decode the first CBOR item of ``data``; returns ``(item, bytes_used)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("CBOR input must be bytes")
    if len(data) > max_bytes:
        raise LimitError("CBOR: input of %d bytes exceeds %d" % (len(data), max_bytes))
    dec = _Decoder(data, max_depth, max_items, max_string)
    obj = dec.item(0)
    if obj is _BREAK:
        raise MalformedError("CBOR: break outside an indefinite-length item")
    return obj, dec.pos
