"""The OTA downloads' per-device budget (``ratelimit.DownloadBudget``) as a property: over
any sequence of requests and clock steps, a device is admitted at most ``requests_burst +
t * requests_per_s`` requests and ``bytes_burst + t * bytes_per_s`` bytes plus one
response; it is never refused while both buckets are full; a refusal's Retry-After is
enough: after it, the same device is admitted. Devices do not share a budget."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_fleet.ratelimit import DownloadBudget

BURST_R, RATE_R, BURST_B, RATE_B = 5, 2.0, 10_000, 1_000.0
steps = st.lists(st.tuples(st.sampled_from(["a", "b"]),
                           st.floats(0, 3, allow_nan=False), st.integers(0, 20_000)),
                 max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_a_device_gets_its_burst_and_rate_and_no_more(seq: list[tuple[str, float, int]]
                                                      ) -> None:
    now = [0.0]
    budget = DownloadBudget(BURST_R, RATE_R, BURST_B, RATE_B, 10, clock=lambda: now[0])
    got = {"a": [0, 0, 0], "b": [0, 0, 0]}  # requests, bytes, largest response
    for device, step, nbytes in seq:
        now[0] += step
        refused = budget.admit(device, nbytes)
        if refused is None:
            g = got[device]
            g[0] += 1
            g[1] += nbytes
            g[2] = max(g[2], nbytes)
        else:
            assert refused.what in ("requests", "bytes") and refused.retry_after_s >= 1
            if nbytes % 2:  # sometimes the device waits as told: then it is admitted
                now[0] += refused.retry_after_s
                assert budget.admit(device, 0) is None
                got[device][0] += 1
    t = now[0]
    for requests, nbytes, largest in got.values():
        assert requests <= BURST_R + t * RATE_R + 1e-6
        assert nbytes <= BURST_B + t * RATE_B + largest + 1e-6


def test_a_fresh_device_is_admitted_and_devices_do_not_share() -> None:
    now = [0.0]
    budget = DownloadBudget(1, 1.0, 100, 1.0, 10, clock=lambda: now[0])
    assert budget.admit("a", 10**9) is None  # one response may overdraw (a whole artifact)
    refused = budget.admit("a", 0)
    assert refused is not None and refused.what == "requests"
    assert budget.admit("b", 50) is None  # another device: its own budget
    now[0] += 1.0
    refused = budget.admit("a", 0)  # the request bucket refilled, the bytes are in debt
    assert refused is not None and refused.what == "bytes"
    assert refused.retry_after_s == 10**9 - 100 - 1  # the debt at 1 byte/s, rounded up
