"""The registry over the API: register, filter, keyset pages, lifecycle rules (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_fleet.models import DeviceState, Role
from cityedge_fleet.registry import TRANSITIONS, TransitionError, check_transition

from support.fleet import Api, device_body

ORDER = ["registered", "provisioned", "active", "quarantined", "retired"]


def test_register_get_update_and_conflicts(api: Api) -> None:
    tech = api.headers(Role.technician)
    r = api.client.post("/devices", json=device_body(1), headers=tech)
    assert r.status_code == 201, r.text
    dev = r.json()
    assert dev["state"] == "registered" and dev["tags"] == ["air"] and dev["chain"] is None
    assert api.client.post("/devices", json=device_body(1), headers=tech).status_code == 409
    same_serial = device_body(2, serial="SN-00001")
    assert api.client.post("/devices", json=same_serial, headers=tech).status_code == 409
    bad_id = device_body(3, id="mac:0024befffe80")
    assert api.client.post("/devices", json=bad_id, headers=tech).status_code == 422
    r = api.client.patch("/devices/%s" % dev["id"], json={"site": "old town",
                                                          "tags": ["noise", "air"]},
                         headers=tech)
    assert r.status_code == 200 and r.json()["site"] == "old town"
    assert r.json()["tags"] == ["air", "noise"]
    got = api.client.get("/devices/%s" % dev["id"], headers=api.headers(Role.viewer)).json()
    assert got["site"] == "old town"
    assert api.client.get("/devices/urn:dev:mac:ffff", headers=tech).status_code == 404


def test_filters_and_keyset_pagination_visit_each_device_once(api: Api) -> None:
    tech = api.headers(Role.technician)
    for i in range(25):
        body = device_body(i, site="harbour" if i % 2 else "park",
                           tags=["air"] if i % 3 == 0 else ["noise"])
        assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 4, "site": "harbour"}
        if after:
            params["after"] = after
        page = api.client.get("/devices", params=params, headers=tech).json()
        seen += [d["id"] for d in page["data"]]
        assert all(d["site"] == "harbour" for d in page["data"])
        pages += 1
        after = page["next_after"]
        if after is None:
            break
    assert len(seen) == len(set(seen)) == 12 and seen == sorted(seen) and pages == 3
    tagged = api.client.get("/devices", params={"tag": "air", "limit": 100},
                            headers=tech).json()["data"]
    assert len(tagged) == 9
    both = api.client.get("/devices", params={"tag": "air", "site": "park", "state":
                                              "registered"}, headers=tech).json()["data"]
    assert {d["id"] for d in both} == {d["id"] for d in tagged if d["site"] == "park"}
    too_big = api.client.get("/devices", params={"limit": 100000}, headers=tech)
    assert too_big.status_code == 422


def test_lifecycle_transitions_enforced_by_the_api(api: Api) -> None:
    dev = device_body(7)
    api.client.post("/devices", json=dev, headers=api.headers(Role.technician))
    sec = api.headers(Role.security)
    url = "/devices/%s/state" % dev["id"]
    r = api.client.post(url, json={"state": "active"}, headers=sec)
    assert r.status_code == 409 and "registered device cannot become active" in r.text
    assert api.client.post(url, json={"state": "retired"}, headers=sec).status_code == 200
    for state in ORDER:
        assert api.client.post(url, json={"state": state}, headers=sec).status_code == 409
    entries = api.client.get("/audit", params={"limit": 500}, headers=sec).json()
    outcomes = [(e["action"], e["outcome"]) for e in entries if e["action"] == "device.state"]
    assert outcomes == [("device.state", "refused"), ("device.state", "ok")] + [
        ("device.state", "refused")] * 5


@given(st.lists(st.sampled_from(list(DeviceState)), max_size=20))
def test_lifecycle_walks_follow_the_table(steps: list[DeviceState]) -> None:
    """Any sequence of requested changes: applied iff the table allows it; retired is final."""
    state = DeviceState.registered
    for new in steps:
        allowed = new in TRANSITIONS[state]
        try:
            check_transition(state, new)
        except TransitionError:
            assert not allowed
            continue
        assert allowed
        assert state != DeviceState.retired
        state = new


def test_transition_table_has_no_way_back_to_registered() -> None:
    for targets in TRANSITIONS.values():
        assert DeviceState.registered not in targets
    assert TRANSITIONS[DeviceState.retired] == frozenset()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_list_query_uses_an_index_for_filters(api: Api) -> None:
    from sqlalchemy import text

    with api.engine.connect() as conn:
        plan = " ".join(str(r) for r in conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT * FROM device WHERE site = 'x' AND id > 'a' "
            "ORDER BY id LIMIT 101")))
    assert "USING INDEX" in plan or "USING PRIMARY KEY" in plan, plan
