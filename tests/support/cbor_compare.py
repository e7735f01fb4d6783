"""Comparing CBOR values: what the codec property tests and the fast path's differential
tests share (hypothesis strategies of CBOR values, equality that tells NaN, -0.0 and map
order apart, and the differences ``fastcbor`` documents against the core's decoder)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import cbor2
from hypothesis import strategies as st

from cityedge_core import cbor
from cityedge_core.errors import MalformedError

keys = st.one_of(st.integers(-(2**64), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5),
        # tags cbor2 gives no meaning to (it interprets many low-numbered ones)
        st.builds(cbor.Tag, st.integers(2**16, 2**32), inner),
    ),
    max_leaves=25,
)


def same(a: Any, b: Any) -> bool:
    """Equal, floats by their bits (NaN equals NaN, -0.0 is not 0.0), maps by their keys."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) ==
                                                      math.copysign(1, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, cbor.Tag) and isinstance(b, cbor.Tag):
        return a.tag == b.tag and same(a.value, b.value)
    return type(a) is type(b) and a == b


UNWRAPPED = {25, 28, 29, 256, 55799}  # tags cbor2 replaces by the value they wrap


# --- comparing what the two decoders made ------------------------------------------------

def norm(x: Any) -> Any:
    """cbor2's objects as the core's: tags, simple values, undefined."""
    if isinstance(x, cbor2.CBORTag):
        return cbor.Tag(x.tag, norm(x.value))
    if isinstance(x, cbor2.CBORSimpleValue):
        return cbor.Simple(x.value)
    if x is cbor2.undefined:
        return cbor.UNDEFINED
    if isinstance(x, list):
        return [norm(i) for i in x]
    if isinstance(x, dict):
        return {norm(k): norm(v) for k, v in x.items()}
    return x


def same_decoded(a: Any, b: Any) -> bool:
    """``same``, but maps also in the order their keys were decoded."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_decoded(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return len(a) == len(b) and all(same_decoded(k, j) and same_decoded(a[k], b[j])
                                        for k, j in zip(a, b, strict=True))
    if isinstance(a, cbor.Tag) and isinstance(b, cbor.Tag):
        return a.tag == b.tag and same_decoded(a.value, b.value)
    return type(a) is type(b) and a == b


def outcome(fn: Any, data: bytes) -> Any:
    try:
        return "ok", fn(data)
    except MalformedError as e:
        return "malformed", str(e)


def documented_difference(core: Any, data: bytes) -> bool:
    """The core's outcome shows one of the differences fastcbor states. A duplicate key
    can also hide the core's first error: cbor2 keeps only the last value, and the value
    that held the error is gone (``has_duplicate_key`` looks for one in the bytes)."""
    if core[0] == "malformed":
        return ("duplicate map key" in core[1] or "bignum longer" in core[1]
                or has_duplicate_key(data))
    return _has_unwrapped_tag(core[1])


def has_duplicate_key(data: bytes) -> bool:
    """A map in ``data`` holds two keys Python's dict takes for one (as cbor2's does)."""
    found = [False]

    def walk(i: int) -> int:
        major, ai = data[i] >> 5, data[i] & 31
        i += 1
        arg: int | None
        if ai < 24:
            arg = ai
        elif ai < 28:
            width = 1 << (ai - 24)
            arg = int.from_bytes(data[i:i + width], "big")
            i += width
        elif ai == 31 and major in (2, 3, 4, 5):
            arg = None
        else:
            raise ValueError("not a head this walk follows")
        if major in (0, 1, 7):
            return i
        if major == 6:
            return walk(i)
        if major in (2, 3):
            if arg is not None:
                return i + arg
            while data[i] != 0xFF:
                i = walk(i)
            return i + 1
        count = (arg if arg is not None else -1) * (2 if major == 5 else 1)
        items: list[bytes] = []
        while count != 0 and not (count < 0 and data[i] == 0xFF):
            start = i
            i = walk(i)
            items.append(data[start:i])
            count -= 1
        if arg is None:
            i += 1
        if major == 5:
            keys = []
            for raw in items[0::2]:
                try:
                    keys.append(cbor2.loads(raw))
                except Exception:
                    continue
            if any(a == b for n, a in enumerate(keys) for b in keys[n + 1:]):
                found[0] = True
        return i

    with contextlib.suppress(ValueError, IndexError, RecursionError):  # the core's error stands
        walk(0)
    return found[0]


def _has_unwrapped_tag(x: Any) -> bool:
    if isinstance(x, cbor.Tag):
        return x.tag in UNWRAPPED or _has_unwrapped_tag(x.value)
    if isinstance(x, list):
        return any(_has_unwrapped_tag(i) for i in x)
    if isinstance(x, dict):
        return any(_has_unwrapped_tag(k) or _has_unwrapped_tag(v) for k, v in x.items())
    return False


def assert_agree(core_fn: Any, fast_fn: Any, data: bytes) -> None:
    core = outcome(core_fn, data)
    fast = outcome(fast_fn, data)
    if documented_difference(core, data):
        return
    assert core[0] == fast[0], (data.hex(), core, fast)
    if core[0] == "ok":
        assert same_decoded(core[1], norm(fast[1])), (data.hex(), core[1], fast[1])
