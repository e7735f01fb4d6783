"""A 422 never echoes the request: no enrollment token, CSR or any other input comes back,
and every 422 body has the documented shape ``{"detail": [{"loc", "msg", "type"}]}``."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cityedge_fleet.models import Role

from support.fleet import Api, device_body, make_csr

SECRET = secrets.token_urlsafe(32)  # looks like an enrollment or API token
CSR_PEM, _ = make_csr("urn:dev:mac:0024befffe800001")
CSR_BODY = CSR_PEM.splitlines()[3]  # a line of the CSR's base64: must not come back either


def _assert_no_echo(r: Any, *secrets_: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"detail"} and body["detail"], body
    for err in body["detail"]:
        assert set(err) == {"loc", "msg", "type"}, err
        assert all(isinstance(p, str | int) for p in err["loc"]) and isinstance(err["msg"], str)
    for s in secrets_:
        assert s not in r.text and json.dumps(s)[1:-1] not in r.text


CASES = {
    # one bad field: FastAPI's default answer carried the whole body as its input
    "control-character-elsewhere": ("/enroll", {"serial": "SN-1\x01", "token": SECRET,
                                                "csr_pem": CSR_PEM}),
    "token-too-long": ("/enroll", {"serial": "SN-1", "token": SECRET * 4, "csr_pem": CSR_PEM}),
    "wrong-type": ("/enroll", {"serial": ["SN-1"], "token": SECRET, "csr_pem": CSR_PEM}),
    "ticket": ("/enroll/ticket", {"serial": "SN-1", "token": SECRET, "csr_pem": CSR_PEM,
                                  "registration": {"id": SECRET, "model": ""}}),
    "csr-too-long": ("/enroll", {"serial": "SN-1", "token": SECRET,
                                 "csr_pem": CSR_PEM + "x" * 8192}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_do_not_echo_tokens_or_csrs(api: Api, case: str) -> None:
    path, body = CASES[case]
    _assert_no_echo(api.client.post(path, json=body), SECRET, CSR_BODY)


def test_a_validator_that_quotes_the_value_is_not_echoed(api: Api) -> None:
    """The device-id check names the offending value in its own message."""
    r = api.client.post("/devices", json=device_body(1, id="urn:dev:" + SECRET + "/x"),
                        headers=api.headers(Role.technician))
    _assert_no_echo(r, SECRET)
    assert r.json()["detail"][0]["loc"] == ["body", "id"]
    r = api.client.post("/tokens", json={"name": SECRET, "role": "admin", "sites": [SECRET]},
                        headers=api.headers(Role.admin))
    _assert_no_echo(r, SECRET)


def test_a_422_a_route_raises_itself_has_the_same_shape(api: Api) -> None:
    r = api.client.post("/enrollment/tokens", json={"serial": "SN-1", "ttl_s": 10**9},
                        headers=api.headers(Role.technician))
    _assert_no_echo(r)
    assert r.json()["detail"] == [{"loc": ["body", "ttl_s"], "type": "value_error",
                                   "msg": "ttl_s may be at most %d"
                                   % api.settings.limits.enroll_token_max_ttl_s}]


def test_the_documented_validation_error_is_what_is_answered(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["ValidationError"]
    assert set(schema["properties"]) == {"loc", "msg", "type"}
    assert schema["additionalProperties"] is False


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.just(SECRET) | st.just(CSR_PEM) | st.just("x\x01" + SECRET),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["serial", "token", "csr_pem", "id", "name", "role", "sites", "model",
                         "site", "tags", "ttl_s", "manifest", "serials", "registration",
                         "state", "reason"]), inner, max_size=6),
    max_leaves=12)
BODY_ROUTES = [("POST", "/enroll"), ("POST", "/enroll/ticket"), ("POST", "/devices"),
               ("POST", "/tokens"), ("POST", "/enrollment/tokens"),
               ("POST", "/enrollment/manifests"), ("PATCH", "/devices/urn:dev:mac:01"),
               ("POST", "/devices/urn:dev:mac:01/state")]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_no_422_echoes_a_secret_whatever_the_body(api: Api) -> None:
    admin = api.headers(Role.admin)

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(route=st.sampled_from(BODY_ROUTES), body=JSON_VALUES)
    def check(route: tuple[str, str], body: Any) -> None:
        r = api.client.request(route[0], route[1], json=body, headers=admin)
        if r.status_code == 422:
            _assert_no_echo(r, SECRET, CSR_BODY)

    check()
