"""CBOR (RFC 8949): deterministic encoder, strict bounded decoder.

Encoding follows RFC 8949 §4.2.1 (core deterministic encoding): shortest ("preferred")
integer and length heads, definite lengths only, floats in the shortest of half/single/double
that keeps the value exactly, NaN as ``f97e00``, map keys sorted by their encoded bytes.

Decoding accepts any *well-formed* item (RFC 8949 §3, Appendix C), including indefinite
lengths and non-preferred heads, and rejects:

- anything not well-formed: reserved additional info 28-30, a lone or misplaced break,
  indefinite-length strings whose chunks are not definite strings of the same type,
  two-byte simple values below 32 (RFC 8949 §3.3; RFC 7049 allowed ``f818``), truncation;
- trailing bytes after the item (``loads`` decodes exactly one item);
- invalid UTF-8 in text strings, duplicate map keys, map keys that are arrays or maps;
- anything over the limits in ``limits`` (bytes, nesting depth, item count, string length).

Tags 2 and 3 (bignums) decode to ``int``; every other tag decodes to ``Tag``. Simple values
other than false/true/null/undefined decode to ``Simple``.

Measured heap (MicroPython unix port): encoding a 50-record SenML batch allocates about 6 KiB
transiently; the decoder holds the input and the decoded objects only.
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


# limits (``limits``) as private consts: the compiler folds them, and the device
# never loads ``limits`` (its names would be interned: "Memory on the device");
# tests/core/test_limit_copies.py holds them equal to ``limits``
_CBOR_MAX_DEPTH = const(16)

_FLOAT_INF = float("inf")


try:
    import micropython  # type: ignore[import-not-found, unused-ignore]  # noqa: F401 (tells the two apart)
except ImportError:  # CPython: the value types are part of this module's API
    from .cbor_types import UNDEFINED as UNDEFINED
    from .cbor_types import Simple as Simple
    from .cbor_types import Tag as Tag

# ---------------------------------------------------------------------------------------------
# Encoding


def _head(out: bytearray, major: int, n: int) -> None:
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(mt | 25)
        out.extend(struct.pack(">H", n))
    elif n < 0x100000000:
        out.append(mt | 26)
        out.extend(struct.pack(">I", n))
    else:
        out.append(mt | 27)
        out.extend(struct.pack(">Q", n))


def _half_bits(value: float) -> Any:
    """IEEE 754 binary16 bits for ``value`` if it converts exactly, else None."""
    f = struct.unpack(">I", struct.pack(">f", value))[0]
    sign = (f >> 16) & 0x8000
    exp = (f >> 23) & 0xFF
    mant = f & 0x7FFFFF
    if exp == 0:
        return sign if mant == 0 else None  # +-0.0; single subnormals are below half range
    e = exp - 127
    if -14 <= e <= 15:
        if mant & 0x1FFF:
            return None
        return sign | ((e + 15) << 10) | (mant >> 13)
    if -24 <= e < -14:
        sig = 0x800000 | mant
        shift = -(e + 1)
        if sig & ((1 << shift) - 1):
            return None
        return sign | (sig >> shift)
    return None


def _encode_float(out: bytearray, value: float) -> None:
    if value != value:  # NaN: one canonical quiet NaN
        out.extend(b"\xf9\x7e\x00")
        return
    if value == _FLOAT_INF:
        out.extend(b"\xf9\x7c\x00")
        return
    if value == -_FLOAT_INF:
        out.extend(b"\xf9\xfc\x00")
        return
    if -3.4028234663852886e38 <= value <= 3.4028234663852886e38:
        single = struct.pack(">f", value)
    else:
        single = b""  # beyond binary32 range: CPython's pack would raise
    if single and struct.unpack(">f", single)[0] == value:
        half = _half_bits(value)
        if half is not None:
            out.append(0xF9)
            out.extend(struct.pack(">H", half))
        else:
            out.append(0xFA)
            out.extend(single)
    else:
        out.append(0xFB)
        out.extend(struct.pack(">d", value))


def _encode_int(out: bytearray, value: int) -> None:
    if value >= 0:
        if value <= 0xFFFFFFFFFFFFFFFF:
            _head(out, 0, value)
            return
        tag, mag = 2, value
    else:
        n = -1 - value
        if n <= 0xFFFFFFFFFFFFFFFF:
            _head(out, 1, n)
            return
        tag, mag = 3, n
    size = 0
    m = mag
    while m:  # int.bit_length() is missing on MicroPython
        m >>= 8
        size += 1
    raw = mag.to_bytes(size, "big")
    _head(out, 6, tag)
    _head(out, 2, len(raw))
    out.extend(raw)


def _encode(out: bytearray, obj: Any, depth: int) -> None:
    if depth > _CBOR_MAX_DEPTH:
        raise ValueError("CBOR: structure nested deeper than %d" % _CBOR_MAX_DEPTH)
    if obj is False:
        out.append(0xF4)
    elif obj is True:
        out.append(0xF5)
    elif obj is None:
        out.append(0xF6)
    elif isinstance(obj, int):
        _encode_int(out, obj)
    elif isinstance(obj, float):
        _encode_float(out, obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _head(out, 2, len(obj))
        out.extend(obj)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        _head(out, 3, len(raw))
        out.extend(raw)
    elif isinstance(obj, (list, tuple)):
        _head(out, 4, len(obj))
        for item in obj:
            _encode(out, item, depth + 1)
    elif isinstance(obj, dict):
        pairs = []
        for k, v in obj.items():
            kbuf = bytearray()
            _encode(kbuf, k, depth + 1)
            pairs.append((bytes(kbuf), v))
        pairs.sort(key=lambda p: p[0])
        _head(out, 5, len(pairs))
        prev = None
        for kb, v in pairs:
            if kb == prev:
                raise ValueError("CBOR: two map keys encode identically")
            prev = kb
            out.extend(kb)
            _encode(out, v, depth + 1)
    else:
        _encode_other(out, obj, depth)


def _encode_other(out: bytearray, obj: Any, depth: int) -> None:
    """Tags, simple values, undefined: their classes load on first use (a device never
    encodes them, and each class costs about 350 bytes of its heap)."""
    from .cbor_types import UNDEFINED, Simple, Tag

    if obj is UNDEFINED:
        out.append(0xF7)
    elif isinstance(obj, Tag):
        _head(out, 6, obj.tag)
        _encode(out, obj.value, depth + 1)
    elif isinstance(obj, Simple):
        if obj.value < 24:
            out.append(0xE0 | obj.value)
        else:
            out.append(0xF8)
            out.append(obj.value)
    else:
        raise TypeError("CBOR: cannot encode %s" % type(obj).__name__)


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` deterministically (RFC 8949 §4.2.1). Returns bytes."""
    out = bytearray()
    _encode(out, obj, 0)
    return bytes(out)


def encode_into(out: bytearray, obj: Any) -> None:
    """Append the deterministic encoding of ``obj`` to the bytearray ``out``."""
    _encode(out, obj, 0)


def encode_head(out: bytearray, major: int, n: int) -> None:
    """Append a CBOR head (major type, argument) to ``out``: for streaming encoders."""
    _head(out, major, n)


def loads(data: Any, **limits_kw: Any) -> Any:
    """Decode exactly one CBOR item from ``data``; trailing bytes are an error.

    Keyword limits: ``max_bytes``, ``max_depth``, ``max_items``, ``max_string``.
    """
    from . import cbor_decode  # on first use: a device that only signs never loads it

    return cbor_decode.loads(data, **limits_kw)


def decode_prefix(data: Any, **limits_kw: Any) -> Any:
    """Decode the first CBOR item of ``data``; returns ``(item, bytes_used)``."""
    from . import cbor_decode  # on first use, as in ``loads``

    return cbor_decode.decode_prefix(data, **limits_kw)
