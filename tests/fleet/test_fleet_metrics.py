"""``GET /metrics``: Prometheus's text format (parsed by the client library's own parser),
for a ``monitor`` token only, with numbers that follow what the fleet does: devices by
state, certificates near expiry, the CRL, audit events, API latency by route template."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, select

from cityedge_fleet.models import Credential, Role

from support.fleet import Api, enroll_device
from support.monitoring import names_offered, names_used

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = api.client.get("/metrics", headers=api.headers(Role.monitor))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_only_a_monitor_token_reads_the_metrics_and_it_reads_nothing_else(api: Api) -> None:
    assert api.client.get("/metrics").status_code == 401
    for role in (Role.viewer, Role.technician, Role.security, Role.vendor):
        assert api.client.get("/metrics", headers=api.headers(role)).status_code == 403
    monitor = api.headers(Role.monitor)
    assert api.client.get("/metrics", headers=monitor).status_code == 200
    for path in ("/devices", "/audit", "/tokens", "/commands/1"):
        assert api.client.get(path, headers=monitor).status_code == 403, path


def test_the_numbers_follow_what_the_fleet_does(api: Api) -> None:
    before = _scrape(api)
    assert before[("cityedge_fleet_crl_present", ())] in (0.0, 1.0)
    dev = enroll_device(api, 1)
    enroll_device(api, 2)
    got = _scrape(api)
    assert got[("cityedge_fleet_devices", (("state", "provisioned"),))] == 2
    enrolled = ("cityedge_fleet_audit_events_total", (("action", "enroll"), ("outcome", "ok")))
    assert got[enrolled] == before.get(enrolled, 0) + 2
    assert got[("cityedge_fleet_certificates_expiring", (("within_days", "30"),))] == 0
    # one certificate now ends in three days: both windows count it
    with Session(api.engine) as s:
        cred = s.exec(select(Credential).where(Credential.device_id == dev.id)).one()
        cred.not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
        s.add(cred)
        s.commit()
        serial = cred.serial
    got = _scrape(api)
    for days in ("7", "30"):
        assert got[("cityedge_fleet_certificates_expiring", (("within_days", days),))] == 1
    # a revocation publishes a CRL: present, just signed, its next update ahead
    r = api.client.post("/devices/%s/credentials/%s/revoke" % (dev.id, serial),
                        headers=api.headers(Role.security), json={"reason": "keyCompromise"})
    assert r.status_code == 200, r.text
    got = _scrape(api)
    assert got[("cityedge_fleet_crl_present", ())] == 1
    assert 0 <= got[("cityedge_fleet_crl_age_seconds", ())] < 3600
    assert got[("cityedge_fleet_crl_next_update_seconds", ())] > 0
    # latency by route template: the device id never becomes a label
    api.client.get("/devices/%s" % dev.id, headers=api.headers(Role.viewer))
    got = _scrape(api)
    routes = {dict(labels).get("route") for (name, labels) in got
              if name == "cityedge_fleet_http_request_duration_seconds_count"}
    assert "/devices/{device_id}" in routes and not any(dev.id in (r or "") for r in routes)
    assert got[("cityedge_fleet_build_info", (("version", got_version(got)),))] == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in got)


def got_version(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    return next(dict(labels)["version"] for name, labels in got
                if name == "cityedge_fleet_build_info")


def test_every_fleet_name_the_alerts_and_dashboards_use_is_served(api: Api) -> None:
    enroll_device(api, 1)
    text = api.client.get("/metrics", headers=api.headers(Role.monitor)).text
    used = names_used("cityedge_fleet_")
    assert len(used) >= 8
    # the ingest's verdicts come from a process that runs an ingest worker (fleet serve
    # with its worker: tests/fleet/test_fleet_e2e.py); every other name is served here
    missing = used - names_offered(text) - {"cityedge_fleet_ingest_batches_total"}
    assert not missing, missing
