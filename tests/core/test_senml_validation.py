"""SenML validation: the fast loop and the per-record rules agree on every pack."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cityedge_core import senml
from cityedge_core.errors import MalformedError

labels = st.sampled_from([senml.BN, senml.BT, senml.BU, senml.BV, senml.BS, senml.BVER,
                          senml.N, senml.U, senml.V, senml.VS, senml.VB, senml.VD, senml.S,
                          senml.T, senml.UT, 99, "x_", "ext"])
value = st.one_of(st.integers(-5, 2**40), st.floats(allow_nan=False), st.text(max_size=140),
                  st.binary(max_size=4), st.booleans(), st.none(), st.lists(st.integers(),
                                                                           max_size=2))
packs = st.lists(st.one_of(st.dictionaries(labels, value, max_size=5), st.integers()),
                 max_size=6)


def verdict(fn: Any, pack: Any) -> bool:
    try:
        fn(pack)
    except MalformedError:
        return False
    return True


@given(packs)
def test_fast_pack_check_equals_record_by_record(pack: list[Any]) -> None:
    def slow(p: list[Any]) -> None:
        for rec in p:
            senml.validate_record(rec)

    assert verdict(senml.validate_pack, pack) == verdict(slow, pack)
