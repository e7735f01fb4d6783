"""The CPython retry helper: doubling, capped, jittered within its bounds, reset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_host.backoff import Backoff


@given(first=st.floats(0.01, 10), factor=st.floats(1, 100), jitter=st.floats(0, 0.99),
       rolls=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=80))
def test_delays_double_up_to_the_cap_within_the_jitter(first: float, factor: float,
                                                        jitter: float, rolls: list[float]) -> None:
    cap = first * factor
    it = iter(rolls)
    b = Backoff(first, cap, jitter, rand=lambda: next(it))
    for n, r in enumerate(rolls):
        base = min(first * 2.0 ** n, cap)
        assert b.next() == pytest.approx(base * (1 - jitter + 2 * jitter * r))
        assert base * (1 - jitter) - 1e-9 <= base * (1 - jitter + 2 * jitter * r) \
            <= base * (1 + jitter) + 1e-9
    assert b.attempts == len(rolls)
    b.reset()
    assert b.attempts == 0


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0, 1, 0.5), (2, 1, 0.5), (1, 2, 1.0),
                                                      (1, 2, -0.1)])
def test_nonsense_is_refused(first: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap, jitter)
