"""Hardware reports over HTTP, on SQLite and PostgreSQL: the security team registers device
models to vendors; a vendor uploads and reads reports of its own models only (403 for
another vendor's or an unregistered model, audited); the fleet keeps the bytes and their
SHA-256, recomputes ``met`` and refuses a forged summary (422, audited, nothing stored);
the security team sees every report; other roles are refused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlmodel import Session, col, func, select

from cityedge_fleet.models import AuditRecord, HwReport, Role

from support.fleet import Api
from support.hw_reports import encode, make_report, register_model, upload, vendor_headers


def _audit(api: Api, action: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == action)
                      .order_by(col(AuditRecord.id))).all()
        return [(r.actor, r.outcome, r.target, json.loads(r.detail)) for r in rows]


def _stored(api: Api) -> int:
    with Session(api.engine) as s:
        return s.exec(select(func.count()).select_from(HwReport)).one()


def test_a_vendor_uploads_a_report_of_its_model_and_reads_it_back(api: Api) -> None:
    register_model(api, "ce-air-1", "acme")
    acme = vendor_headers(api, "acme")
    data = encode(make_report("ce-air-1"))
    r = upload(api, acme, data)
    assert r.status_code == 201, r.text
    got = r.json()
    assert (got["model"], got["vendor"], got["profile"], got["met"]) == (
        "ce-air-1", "acme", "city-baseline", True)
    assert got["sha256"] == hashlib.sha256(data).hexdigest() and got["size"] == len(data)
    assert got["uploaded_by"] == "vendor-acme"
    one = api.client.get("/hw/reports/%d" % got["id"], headers=acme).json()
    assert one["report"] == json.loads(data) and one["sha256"] == got["sha256"]
    raw = api.client.get("/hw/reports/%d/raw" % got["id"], headers=acme)
    assert raw.status_code == 200 and raw.content == data
    assert raw.headers["x-content-sha256"] == got["sha256"]
    assert _audit(api, "hw.report.upload") == [
        ("vendor-acme", "ok", "ce-air-1", {"id": got["id"], "profile": "city-baseline",
                                           "met": True, "sha256": got["sha256"],
                                           "size": len(data)})]


def test_a_vendor_cannot_read_or_upload_another_vendors_reports(api: Api) -> None:
    register_model(api, "ce-air-1", "acme")
    register_model(api, "gx-noise-2", "globex")
    acme, globex = vendor_headers(api, "acme"), vendor_headers(api, "globex")
    assert upload(api, acme, make_report("ce-air-1")).status_code == 201
    theirs = upload(api, globex, make_report("gx-noise-2", vendor="globex")).json()["id"]
    # upload for globex's model: refused, nothing stored
    r = upload(api, acme, make_report("gx-noise-2"))
    assert r.status_code == 403
    assert r.json()["detail"] == "device model gx-noise-2 is not registered to your vendor"
    assert _stored(api) == 2
    # read globex's report, by id, raw, or by listing its model
    for path in ("/hw/reports/%d" % theirs, "/hw/reports/%d/raw" % theirs):
        assert api.client.get(path, headers=acme).status_code == 403
    assert api.client.get("/hw/reports", params={"model": "gx-noise-2"},
                          headers=acme).status_code == 403
    listed = api.client.get("/hw/reports", headers=acme).json()["data"]
    assert [(x["model"], x["vendor"]) for x in listed] == [("ce-air-1", "acme")]
    models = api.client.get("/hw/models", headers=acme).json()
    assert [(m["name"], m["vendor"]) for m in models] == [("ce-air-1", "acme")]
    denied = [(actor, target) for actor, outcome, target, _ in
              _audit(api, "hw.report.upload") + _audit(api, "hw.report.read")
              if outcome == "denied"]
    assert denied == [("vendor-acme", "gx-noise-2"), ("vendor-acme", str(theirs)),
                      ("vendor-acme", str(theirs)), ("vendor-acme", "gx-noise-2")]


def test_a_vendor_cannot_upload_for_an_unregistered_model(api: Api) -> None:
    """The same answer as for another vendor's model: a vendor does not learn which
    models exist."""
    acme = vendor_headers(api, "acme")
    r = upload(api, acme, make_report("ce-unknown-9"))
    assert r.status_code == 403
    assert r.json()["detail"] == "device model ce-unknown-9 is not registered to your vendor"
    assert _stored(api) == 0
    [(actor, outcome, target, detail)] = _audit(api, "hw.report.upload")
    assert (actor, outcome, target, detail["vendor"]) == (
        "vendor-acme", "denied", "ce-unknown-9", "acme")


def test_a_vendor_token_without_a_vendor_uploads_and_sees_nothing(api: Api) -> None:
    register_model(api, "ce-air-1", "acme")
    assert upload(api, vendor_headers(api, "acme"), make_report("ce-air-1")).status_code == 201
    nameless = vendor_headers(api, None)  # a vendor token made before 0011
    assert upload(api, nameless, make_report("ce-air-1")).status_code == 403
    assert api.client.get("/hw/reports", headers=nameless).json()["data"] == []
    assert api.client.get("/hw/models", headers=nameless).json() == []


def test_a_forged_summary_is_refused_audited_and_not_stored(api: Api) -> None:
    """The attack: the vendor's board fails a requirement, and the vendor edits the
    report's summary to say the profile is met."""
    register_model(api, "ce-air-1", "acme")
    first = make_report("ce-air-1")["requirements"][0]["id"]
    forged = make_report("ce-air-1", outcomes={first: "fail"}, met=True)
    r = upload(api, vendor_headers(api, "acme"), forged)
    assert r.status_code == 422
    msgs = [e["msg"] for e in r.json()["detail"]]
    assert any("summary.met is true but the outcomes make it false" in m for m in msgs), msgs
    assert _stored(api) == 0
    [(actor, outcome, target, detail)] = _audit(api, "hw.report.upload")
    assert (actor, outcome, target, detail["code"]) == (
        "vendor-acme", "refused", "ce-air-1", "summary")


def test_a_report_that_is_not_json_is_refused_and_audited(api: Api) -> None:
    r = upload(api, vendor_headers(api, "acme"), b"{not json")
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"].startswith("the report is not JSON")
    [(_, outcome, target, detail)] = _audit(api, "hw.report.upload")
    assert (outcome, target, detail["code"]) == ("refused", "", "form")


def test_a_report_over_the_size_limit_is_413_before_it_is_read(api: Api) -> None:
    limit = api.settings.limits.hw_report_max_bytes
    r = upload(api, vendor_headers(api, "acme"), b" " * (limit + 1))
    assert r.status_code == 413
    assert r.json()["detail"] == "request body larger than %d bytes" % limit


def test_the_security_team_sees_every_report_and_may_upload_for_any_model(api: Api) -> None:
    register_model(api, "ce-air-1", "acme")
    register_model(api, "gx-noise-2", "globex")
    security = api.headers(Role.security)
    upload(api, vendor_headers(api, "acme"), make_report("ce-air-1"))
    first = make_report("gx-noise-2")["requirements"][0]["id"]
    r = upload(api, security, make_report("gx-noise-2", outcomes={first: "fail"}))
    assert r.status_code == 201 and r.json()["met"] is False
    assert r.json()["vendor"] == "globex" and r.json()["uploaded_by"] == "test-security"
    listed = api.client.get("/hw/reports", headers=security).json()
    assert [x["model"] for x in listed["data"]] == ["gx-noise-2", "ce-air-1"]  # newest first
    page = api.client.get("/hw/reports", params={"limit": 1}, headers=security).json()
    nxt = api.client.get("/hw/reports", params={"limit": 1, "after": page["next_after"]},
                         headers=security).json()
    assert [x["model"] for x in page["data"] + nxt["data"]] == ["gx-noise-2", "ce-air-1"]
    assert len(api.client.get("/hw/models", headers=security).json()) == 2
    unknown = upload(api, security, make_report("ce-unknown-9"))
    assert unknown.status_code == 422
    assert "not registered: register it first" in unknown.json()["detail"][0]["msg"]


@pytest.mark.parametrize("role", [Role.technician, Role.viewer, Role.release_manager])
def test_other_roles_may_not_touch_hardware_reports(api: Api, role: Role) -> None:
    register_model(api, "ce-air-1", "acme")
    headers = api.headers(role)
    assert upload(api, headers, make_report("ce-air-1")).status_code == 403
    assert api.client.get("/hw/reports", headers=headers).status_code == 403
    assert api.client.get("/hw/models", headers=headers).status_code == 403
    assert api.client.post("/hw/models", json={"name": "x", "vendor": "acme"},
                           headers=headers).status_code == 403


def test_only_the_security_team_registers_models_and_a_model_keeps_its_vendor(
        api: Api) -> None:
    acme = vendor_headers(api, "acme")
    r = api.client.post("/hw/models", json={"name": "ce-air-1", "vendor": "acme"},
                        headers=acme)
    assert r.status_code == 403  # a vendor cannot register models, even to itself
    register_model(api, "ce-air-1", "acme")
    security = api.headers(Role.security)
    again = api.client.post("/hw/models", json={"name": "ce-air-1", "vendor": "acme"},
                            headers=security)
    assert again.status_code == 200 and again.json()["vendor"] == "acme"
    taken = api.client.post("/hw/models", json={"name": "ce-air-1", "vendor": "globex"},
                            headers=security)
    assert taken.status_code == 409
    assert taken.json()["detail"] == "device model ce-air-1 is registered to vendor acme already"
    assert [(o, t, d["vendor"]) for _, o, t, d in _audit(api, "hw.model.register")] == [
        ("ok", "ce-air-1", "acme"), ("refused", "ce-air-1", "globex")]
    bad = api.client.post("/hw/models", json={"name": "ce-air-2", "vendor": "Acme Ltd"},
                          headers=security)
    assert bad.status_code == 422


def test_a_vendor_token_names_its_vendor_and_no_other_token_does(api: Api) -> None:
    admin = api.headers(Role.admin)
    r = api.client.post("/tokens", json={"name": "acme-upload", "role": "vendor",
                                         "vendor": "acme"}, headers=admin)
    assert r.status_code == 201 and r.json()["vendor"] == "acme"
    assert api.client.post("/tokens", json={"name": "x", "role": "vendor"},
                           headers=admin).status_code == 422
    assert api.client.post("/tokens", json={"name": "y", "role": "technician",
                                            "vendor": "acme"}, headers=admin).status_code == 422
    register_model(api, "ce-air-1", "acme")
    token = {"Authorization": "Bearer %s" % r.json()["token"]}
    assert upload(api, token, make_report("ce-air-1")).status_code == 201


def test_a_report_written_by_hw_check_is_accepted_as_it_is(api: Api) -> None:
    """The checker's own output (not a test builder's): the bundled hardened ESP32-S3 capture
    with the example declaration, checked against city-baseline as ``cityedge hw check`` does,
    uploads unchanged; the fleet's recomputed ``met`` and counts equal the checker's."""
    from pathlib import Path

    import cityedge_hardware
    from cityedge_hardware.check import CheckInputs, check_report
    from cityedge_hardware.evidence import load_declaration

    pkg = Path(cityedge_hardware.__file__).parent
    decl = load_declaration(pkg / "examples" / "vendor.yaml")
    doc = check_report(CheckInputs(platform="esp32",
                                   efuse_json=pkg / "captures" / "esp32s3_hardened.json",
                                   declaration=decl), "city-baseline")
    model = doc["device"]["model"]
    register_model(api, model, "acme")
    r = upload(api, vendor_headers(api, "acme"), encode(doc))
    assert r.status_code == 201, r.text
    got = r.json()
    assert (got["model"], got["met"]) == (model, doc["summary"]["met"])
    stored = api.client.get("/hw/reports/%d" % got["id"],
                            headers=vendor_headers(api, "acme")).json()["report"]
    assert stored["summary"] == doc["summary"] and stored["requirements"] == doc["requirements"]


def test_a_stolen_device_has_no_way_into_the_hardware_reports(api: Api) -> None:
    """A device holds a certificate and a claim secret, never an API token: every report and
    model route refuses a request without a token (401) or with a made-up one, and nothing is
    stored or withdrawn for its model."""
    register_model(api, "ce-air-1", "acme")
    assert upload(api, vendor_headers(api, "acme"), make_report("ce-air-1")).status_code == 201
    failing = encode(make_report("ce-air-1", default="fail"))
    for headers in ({}, {"Authorization": "Bearer " + "x" * 43}):
        assert upload(api, headers, failing).status_code == 401
        for path in ("/hw/reports", "/hw/reports/1", "/hw/reports/1/raw", "/hw/models"):
            assert api.client.get(path, headers=headers).status_code == 401, path
        r = api.client.post("/hw/models", json={"name": "ce-air-1", "vendor": "evil"},
                            headers=headers)
        assert r.status_code == 401
    assert _stored(api) == 1
