"""The ingest's fast SenML-to-rows path agrees with the core's ``senml.resolve`` on every
validated pack: same rows, and a ``MalformedError`` exactly where the reference raises
(also for resolved names over the column width and sums that overflow)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import senml
from cityedge_core.errors import MalformedError, PeerError
from cityedge_fleet import reading_rows

NAMES = st.one_of(st.text(alphabet="ab0:-_.é ", max_size=6),
                  st.sampled_from(["a" * 128, "b" * 64, "c" * 65]))  # bn + n over 192
NUMBERS = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False,
                                                           allow_infinity=False),
                    st.sampled_from([0, 2**28 - 1, 2**28, 1_790_000_000, 2**63 - 1,
                                     -(2**63), 1.7e308, -1.7e308]))  # sums overflow
FIELD = {
    senml.BN: NAMES, senml.BT: NUMBERS, senml.BU: st.sampled_from(["Cel", "%RH"]),
    senml.BV: NUMBERS, senml.BS: NUMBERS, senml.N: NAMES, senml.T: NUMBERS,
    senml.U: st.sampled_from(["ug/m3", "W"]), senml.V: NUMBERS, senml.S: NUMBERS,
    senml.VS: st.text(max_size=4), senml.VB: st.booleans(), senml.VD: st.binary(max_size=4),
    senml.UT: NUMBERS, 99: st.integers(),
}


@st.composite
def records(draw: Any) -> dict[int, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(FIELD)), max_size=6, unique=True))
    return {k: draw(FIELD[k]) for k in keys}


def _outcome(fn: Any, recs: list[Any], now: float) -> Any:
    try:
        return fn("dev", recs, now, (7, "ok", 0, None))
    except PeerError as e:
        return type(e)


def _resolved_names(recs: list[Any]) -> list[str]:
    bn, out = "", []
    for rec in recs:
        bn = rec.get(senml.BN, bn)
        out.append(bn + rec.get(senml.N, ""))
    return out


def _valid(name: str) -> bool:
    try:
        senml.resolve([{senml.N: name, senml.V: 0}])
    except PeerError:
        return False
    return True


@settings(max_examples=600, deadline=None)
@given(recs=st.lists(records(), max_size=6), now=st.sampled_from([0.0, 1_790_000_000.5]),
       warm=st.booleans())
def test_fast_rows_match_the_reference(recs: list[Any], now: float, warm: bool) -> None:
    try:
        senml.validate_pack(recs)  # what Batch.from_map did before the ingest sees it
    except PeerError:
        return
    reading_rows._valid_names.clear()
    if warm:  # every valid name already known: the fast loop decides alone
        reading_rows._valid_names.update(n for n in _resolved_names(recs) if _valid(n))
    expected = _outcome(lambda d, r, n, t: [
        reading_rows._row(d, rec, t) for rec in senml.resolve(r, n)], recs, now)
    assert _outcome(reading_rows.rows, recs, now) == expected


def test_an_unseen_bad_name_is_refused_by_the_reference() -> None:
    reading_rows._valid_names.clear()
    with pytest.raises(MalformedError):
        reading_rows.rows("dev", [{senml.N: "bad name", senml.V: 1}], 0.0, ())
    with pytest.raises(MalformedError):  # a cached name does not excuse a missing value
        reading_rows.rows("dev", [{senml.N: "ok", senml.V: 1}, {senml.N: "ok"}], 0.0, ())


@pytest.mark.parametrize("warm", [False, True])
def test_resolved_overflow_is_refused_on_both_paths(warm: bool) -> None:
    """bv + v, bs + s and bt + t of two finite floats can be infinite; two 64-bit integers
    add up beyond 64 bits, which is stored as a float."""
    huge = 1.7976931348623157e308
    reading_rows._valid_names.clear()
    if warm:
        reading_rows._valid_names.add("x")
    for rec in ({senml.N: "x", senml.BV: huge, senml.V: huge},
                {senml.N: "x", senml.BS: -huge, senml.S: -huge},
                {senml.N: "x", senml.BT: huge, senml.T: huge, senml.V: 1}):
        senml.validate_pack([rec])
        with pytest.raises(MalformedError):
            reading_rows.rows("dev", [rec], 0.0, ())
    big = 2**63 - 1
    (row,) = reading_rows.rows("dev", [{senml.N: "x", senml.BV: big, senml.V: big}], 0.0, ())
    assert row[4] == float(2 * big) and type(row[4]) is float
