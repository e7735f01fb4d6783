"""Property tests of the core CBOR codec (hypothesis), and against cbor2 as a second opinion."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import cbor
from cityedge_core.errors import MalformedError

from support.cbor_compare import same, values


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
