"""Property tests of the core CBOR codec (hypothesis), and against cbor2 as a second opinion."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import cbor2
from hypothesis import given, settings
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


@given(values)
def test_roundtrip(value: Any) -> None:
    data = cbor.dumps(value)
    assert same(cbor.loads(data), value)
    assert cbor.dumps(cbor.loads(data)) == data  # deterministic: one encoding per value


@given(values)
def test_cbor2_reads_what_we_write(value: Any) -> None:
    theirs = cbor2.loads(cbor.dumps(value))

    def norm(x: Any) -> Any:
        if isinstance(x, cbor2.CBORTag):
            return cbor.Tag(x.tag, norm(x.value))
        if isinstance(x, list):
            return [norm(i) for i in x]
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        return x

    assert same(norm(theirs), value)


@given(st.floats(allow_nan=False))
def test_float_shortest_form_is_exact(x: float) -> None:
    data = cbor.dumps(x)
    assert len(data) in (3, 5, 9)
    assert same(cbor.loads(data), x)
    if len(data) == 9:
        assert cbor2.loads(b"\xfa" + cbor2.dumps(x)[1:5]) != x if abs(x) < 3.4e38 else True


@given(st.binary(max_size=64))
@settings(max_examples=400)
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(MalformedError):
        cbor.loads(data)


@given(values, st.data())
def test_truncation_is_always_detected(value: Any, data: st.DataObject) -> None:
    enc = cbor.dumps(value)
    cut = data.draw(st.integers(0, len(enc) - 1))
    try:
        cbor.loads(enc[:cut])
    except MalformedError:
        return
    raise AssertionError("truncated input accepted")
