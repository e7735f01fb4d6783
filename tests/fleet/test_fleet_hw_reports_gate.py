"""The enrollment gate on hardware reports, on SQLite and PostgreSQL: with
``hw_report_profile`` set, a device whose model has no report for that profile, or whose
newest report does not meet it, is refused (403, audited with the reason, its token kept);
a passing report lets it in (the audit row names the report); a newer failing report
withdraws it again. Off (the default), enrollment does not look at reports. A site may
ask for another profile (``hw_report_site_profiles``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import Session, col, select

from cityedge_fleet.app import create_app
from cityedge_fleet.config import Settings, describe_errors
from cityedge_fleet.models import AuditRecord, Device, Role

from support.fleet import Api, device_body, make_csr
from support.hw_reports import make_report, register_model, upload, vendor_headers


@pytest.fixture
def gated(settings: Settings) -> Iterator[Api]:
    on = settings.model_copy(update={"hw_report_profile": "city-baseline",
                                     "hw_report_site_profiles": {"waterworks":
                                                                 "city-critical"}})
    app = create_app(on, init_db=True)
    with TestClient(app) as client:
        yield Api(client, on)
    app.state.engine.dispose()


def _device(api: Api, i: int, **extra: object) -> tuple[dict[str, object], str]:
    """Register device ``i`` (model ce-air-1 unless told) and issue its enrollment token."""
    body = device_body(i, **extra)
    tech = api.headers(Role.technician)
    assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    r = api.client.post("/enrollment/tokens", json={"serial": body["serial"]}, headers=tech)
    return body, str(r.json()["token"])


def _enroll(api: Api, body: dict[str, object], token: str) -> Any:
    csr, _ = make_csr(str(body["id"]))
    return api.client.post("/enroll", json={"serial": body["serial"], "token": token,
                                            "csr_pem": csr})


def _enroll_audit(api: Api) -> list[tuple[str, dict[str, Any]]]:
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "enroll")
                      .order_by(col(AuditRecord.id))).all()
        return [(r.outcome, json.loads(r.detail)) for r in rows]


def _state(api: Api, device_id: object) -> str:
    with Session(api.engine) as s:
        device = s.get(Device, device_id)
        assert device is not None
        return str(device.state)


def _failing(model: str, **kw: Any) -> dict[str, Any]:
    first = make_report(model)["requirements"][0]["id"]
    return make_report(model, outcomes={first: "fail"}, **kw)


def test_without_a_report_enrollment_is_refused_and_audited(gated: Api) -> None:
    body, token = _device(gated, 1)
    r = _enroll(gated, body, token)
    assert r.status_code == 403
    assert r.json()["detail"] == (
        "device model ce-air-1 has no hardware report for profile city-baseline, which this "
        "fleet requires before enrollment: the model's vendor uploads one (`cityedge hw "
        "upload`)")
    [(outcome, detail)] = _enroll_audit(gated)
    assert (outcome, detail["code"], detail["status"]) == ("refused", "hw-report-missing", 403)
    assert _state(gated, body["id"]) == "registered"


def test_a_passing_report_lets_it_in_and_a_newer_failing_one_withdraws_it(gated: Api) -> None:
    register_model(gated, "ce-air-1", "acme")
    acme = vendor_headers(gated, "acme")
    # a passing report of another profile or another model does not count
    register_model(gated, "ce-noise-2", "acme")
    assert upload(gated, acme, make_report("ce-noise-2")).status_code == 201
    assert upload(gated, acme, make_report("ce-air-1",
                                           profile="city-critical")).status_code == 201
    first, first_token = _device(gated, 1)
    assert _enroll(gated, first, first_token).status_code == 403
    passing = upload(gated, acme, make_report("ce-air-1")).json()["id"]
    r = _enroll(gated, first, first_token)  # the refusal did not use the token up
    assert r.status_code == 200, r.text
    outcome, detail = _enroll_audit(gated)[-1]
    assert (outcome, detail["gate"]) == ("ok", "token+hw-report:%d" % passing)
    # newer, failing (claiming an older time: the fleet's order decides, not the vendor's)
    failing = upload(gated, acme, _failing("ce-air-1", generated_at="2020-01-01T00:00:00Z"))
    assert failing.status_code == 201 and failing.json()["met"] is False
    second, second_token = _device(gated, 2)
    r = _enroll(gated, second, second_token)
    assert r.status_code == 403
    assert r.json()["detail"].startswith(
        "the newest hardware report for device model ce-air-1 and profile city-baseline "
        "(report %d, uploaded " % failing.json()["id"])
    assert _enroll_audit(gated)[-1][1]["code"] == "hw-report-not-met"
    # fixed and uploaded again: the same token enrolls
    again = upload(gated, acme, make_report("ce-air-1")).json()["id"]
    r = _enroll(gated, second, second_token)
    assert r.status_code == 200
    assert _enroll_audit(gated)[-1][1]["gate"] == "token+hw-report:%d" % again
    assert _state(gated, first["id"]) == _state(gated, second["id"]) == "provisioned"


def test_a_site_can_require_another_profile(gated: Api) -> None:
    register_model(gated, "ce-air-1", "acme")
    acme = vendor_headers(gated, "acme")
    assert upload(gated, acme, make_report("ce-air-1")).status_code == 201
    body, token = _device(gated, 1, site="waterworks")
    r = _enroll(gated, body, token)
    assert r.status_code == 403 and "profile city-critical" in r.json()["detail"]
    assert upload(gated, acme, make_report("ce-air-1",
                                           profile="city-critical")).status_code == 201
    assert _enroll(gated, body, token).status_code == 200


def test_the_ticket_enrollment_is_gated_too(gated: Api) -> None:
    body, token = _device(gated, 1)
    csr, _ = make_csr(str(body["id"]))
    r = gated.client.post("/enroll/ticket", json={"serial": body["serial"], "token": token,
                                                  "csr_pem": csr})
    assert r.status_code == 403 and "has no hardware report" in r.json()["detail"]
    with Session(gated.engine) as s:
        row = s.exec(select(AuditRecord).where(AuditRecord.action == "enroll.ticket")).one()
    assert (row.outcome, json.loads(row.detail)["code"]) == ("refused", "hw-report-missing")


def test_with_the_setting_off_enrollment_does_not_look_at_reports(api: Api) -> None:
    assert api.settings.hw_report_profile is None and not api.settings.hw_report_site_profiles
    register_model(api, "ce-air-1", "acme")
    assert upload(api, vendor_headers(api, "acme"), _failing("ce-air-1")).status_code == 201
    body, token = _device(api, 1)  # its model's only report fails: nothing changes
    assert _enroll(api, body, token).status_code == 200
    other, other_token = _device(api, 2, model="no-report-at-all")
    assert _enroll(api, other, other_token).status_code == 200
    assert [d["gate"] for _, d in _enroll_audit(api)] == ["token", "token"]


def test_an_unknown_gate_profile_stops_the_start_naming_the_variable() -> None:
    with pytest.raises(ValidationError) as e:
        Settings(mode="development", hw_report_profile="city-typo")
    [line] = describe_errors(e.value)
    assert line.startswith("CITYEDGE_HW_REPORT_PROFILE: 'city-typo' is not a bundled "
                           "hardware profile; one of city-baseline, city-critical")
    with pytest.raises(ValidationError):
        Settings(mode="development", hw_report_site_profiles={"harbour": "nope"})
