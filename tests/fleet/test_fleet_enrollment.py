"""Gated enrollment: token or allow-list, one use, every refusal has a reason and an audit
row; the issued chain verifies with OpenSSL; rate limiting."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import update
from sqlmodel import Session, select

from cityedge_fleet.models import AuditRecord, EnrollmentToken, Role

from .conftest import Api, device_body
from .test_fleet_ca import make_csr


def _register(api: Api, i: int = 1) -> dict[str, object]:
    body = device_body(i)
    r = api.client.post("/devices", json=body, headers=api.headers(Role.technician))
    assert r.status_code == 201, r.text
    return body


def _token(api: Api, serial: str, ttl_s: int | None = None) -> str:
    body: dict[str, object] = {"serial": serial}
    if ttl_s:
        body["ttl_s"] = ttl_s
    r = api.client.post("/enrollment/tokens", json=body, headers=api.headers(Role.technician))
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def _enroll_audit(api: Api) -> list[AuditRecord]:
    with Session(api.engine) as s:
        return list(s.exec(select(AuditRecord).where(AuditRecord.action == "enroll")
                           .order_by(AuditRecord.id)))  # type: ignore[arg-type]


def test_enroll_with_token_returns_a_chain_openssl_accepts(api: Api, tmp_path: Path) -> None:
    dev = _register(api)
    token = _token(api, str(dev["serial"]))
    csr, _ = make_csr(str(dev["id"]))
    r = api.client.post("/enroll", json={"serial": dev["serial"], "token": token,
                                         "csr_pem": csr})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"] == dev["id"]
    assert body["broker_url"] == "mqtts://127.0.0.1:8883"
    assert body["config"]["topics"]["readings"] == "ce/v1/%s/up/readings" % dev["id"]
    (tmp_path / "chain.pem").write_text(body["chain_pem"])
    (tmp_path / "bundle.pem").write_text(body["ca_bundle_pem"])
    (tmp_path / "leaf.pem").write_text(body["certificate_pem"])
    v = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "bundle.pem"),
                        "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                       capture_output=True, timeout=30)
    assert v.returncode == 0, v.stderr
    viewer = api.headers(Role.viewer)
    got = api.client.get("/devices/%s" % dev["id"], headers=viewer).json()
    assert got["state"] == "provisioned"
    creds = api.client.get("/devices/%s/credentials" % dev["id"], headers=viewer).json()
    assert len(creds) == 1 and creds[0]["status"] == "active" and len(creds[0]["kid"]) == 16
    assert body["config"]["kid"] == creds[0]["kid"]
    rows = _enroll_audit(api)
    assert [r.outcome for r in rows] == ["ok"] and '"gate":"token"' in rows[0].detail


def _expire(api: Api) -> None:
    with Session(api.engine) as s:
        s.execute(update(EnrollmentToken).values(
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        s.commit()


@pytest.mark.parametrize(("case", "status", "message"), [
    ("reuse", 403, "already used"),
    ("expired", 403, "has expired"),
    ("wrong-serial", 403, "issued for another serial"),
    ("unknown-token", 403, "unknown enrollment token"),
    ("no-gate", 403, "not allow-listed"),
    ("unregistered", 403, "is not registered"),
    ("malformed-csr", 422, "not a PEM PKCS#10"),
    ("rsa-key", 422, "must be EC P-256"),
    ("p384-key", 422, "must be EC P-256"),
    ("cn-mismatch", 422, "must equal the device id"),
])
def test_refusals_have_a_reason_and_are_audited(api: Api, case: str, status: int,
                                                message: str) -> None:
    dev = _register(api, 1)
    other = _register(api, 2)
    serial, dev_id = str(dev["serial"]), str(dev["id"])
    token: str | None = _token(api, serial)
    csr, _ = make_csr(dev_id)
    if case == "reuse":
        first = api.client.post("/enroll", json={"serial": serial, "token": token,
                                                 "csr_pem": csr})
        assert first.status_code == 200
    elif case == "expired":
        _expire(api)
    elif case == "wrong-serial":
        serial = str(other["serial"])
        csr, _ = make_csr(str(other["id"]))
    elif case == "unknown-token":
        token = "x" * 43
    elif case == "no-gate":
        token = None
    elif case == "unregistered":
        serial = "SN-NOT-HERE"
    elif case == "malformed-csr":
        csr = "hello"
    elif case == "rsa-key":
        csr, _ = make_csr(dev_id, rsa.generate_private_key(65537, 2048))
    elif case == "p384-key":
        csr, _ = make_csr(dev_id, ec.generate_private_key(ec.SECP384R1()))
    elif case == "cn-mismatch":
        csr, _ = make_csr(str(other["id"]))
    r = api.client.post("/enroll", json={"serial": serial, "token": token, "csr_pem": csr})
    assert r.status_code == status, r.text
    assert message in r.text  # a 422's detail is a list of {loc, msg, type}
    last = _enroll_audit(api)[-1]
    assert last.outcome == "refused" and message in last.detail
    if status == 422 or case == "expired":  # the token was not consumed by a refusal
        with Session(api.engine) as s:
            assert all(t.used_at is None for t in s.exec(select(EnrollmentToken)))
    state = api.client.get("/devices/%s" % dev_id, headers=api.headers(Role.viewer)).json()
    assert state["state"] == ("provisioned" if case == "reuse" else "registered")


def test_allow_listed_serial_enrolls_once(api: Api) -> None:
    dev = _register(api, 3)
    r = api.client.post("/enrollment/manifests", json={"manifest": "DN-2026-001", "serials": [
        dev["serial"], "SN-99999", dev["serial"]]}, headers=api.headers(Role.technician))
    assert r.status_code == 201 and r.json()["added"] == 2
    csr, _ = make_csr(str(dev["id"]))
    ok = api.client.post("/enroll", json={"serial": dev["serial"], "csr_pem": csr})
    assert ok.status_code == 200, ok.text
    assert '"gate":"allow-list:DN-2026-001"' in _enroll_audit(api)[-1].detail
    again = api.client.post("/enroll", json={"serial": dev["serial"], "csr_pem": csr})
    assert again.status_code == 403


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_enrollment_attempts_are_rate_limited(api: Api) -> None:
    burst = api.settings.limits.enroll_burst
    codes = [api.client.post("/enroll", json={"serial": "SN-X", "token": "t",
                                              "csr_pem": "x"}).status_code
             for _ in range(burst + 2)]
    assert codes[:burst] == [403] * burst and codes[burst:] == [429, 429]


def test_token_ttl_is_bounded(api: Api) -> None:
    r = api.client.post("/enrollment/tokens", json={"serial": "SN-1", "ttl_s": 10**9},
                        headers=api.headers(Role.technician))
    assert r.status_code == 422
