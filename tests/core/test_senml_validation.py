"""SenML validation: the fast loop and the per-record rules agree on every pack, whatever
the texts the fast loop has already seen; what they accept is within the storage bounds."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cityedge_core import limits, senml
from cityedge_core.errors import MalformedError

labels = st.sampled_from([senml.BN, senml.BT, senml.BU, senml.BV, senml.BS, senml.BVER,
                          senml.N, senml.U, senml.V, senml.VS, senml.VB, senml.VD, senml.S,
                          senml.T, senml.UT, 99, "x_", "ext", "e\x00t", 2**64])
text = st.one_of(st.text(max_size=140), st.text(alphabet="ab\x00\x1f\x7f\x85\xa0µ", max_size=8),
                 st.sampled_from(["a" * 64, "a" * 65, "a" * 128, "a" * 129, "a" * 256,
                                  "a" * 257]))
value = st.one_of(st.integers(-5, 2**40), st.integers(-(2**70), 2**70),
                  st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
                  st.floats(), text, st.binary(max_size=4), st.booleans(), st.none(),
                  st.lists(st.integers(), max_size=2))
packs = st.lists(st.one_of(st.dictionaries(labels, value, max_size=5), st.integers()),
                 max_size=6)


def verdict(fn: Any, pack: Any) -> bool:
    try:
        fn(pack)
    except MalformedError:
        return False
    return True


def _slow(pack: list[Any]) -> None:
    for rec in pack:
        senml.validate_record(rec)


@given(packs)
def test_fast_pack_check_equals_record_by_record(pack: list[Any]) -> None:
    assert verdict(senml.validate_pack, pack) == verdict(_slow, pack)
    assert verdict(senml.validate_pack, pack) == verdict(_slow, pack)  # texts now known


def _bounded(val: Any) -> bool:
    if isinstance(val, bool | bytes):
        return True
    if isinstance(val, int):
        return -(2**63) <= val < 2**63
    if isinstance(val, float):
        return val - val == 0
    if isinstance(val, str):
        return len(val) <= limits.SENML_STRING_MAX_CHARS and not any(
            ord(c) < 32 or ord(c) == 127 for c in val)
    return False


@given(packs)
def test_what_is_accepted_is_within_the_storage_bounds(pack: list[Any]) -> None:
    if not verdict(senml.validate_pack, pack):
        return
    for rec in pack:
        for key, val in rec.items():
            assert _bounded(key) and _bounded(val), (key, val)
        for label in (senml.U, senml.BU):
            assert len(rec.get(label, "")) <= limits.SENML_NAME_MAX_CHARS
