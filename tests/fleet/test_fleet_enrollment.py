"""Gated enrollment: a token, or an allow-listed serial with its claim secret; one use;
every refusal before the gate reads the same to the caller and has its reason in the audit
log; a used ticket token yields only the enrolled key's own certificate; a key serves one
device; the issued chain verifies with OpenSSL; rate limiting."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import Session, col, select

from cityedge_fleet import enrollment
from cityedge_fleet.auth import hash_token
from cityedge_fleet.models import AllowedSerial, AuditRecord, EnrollmentToken, Role
from cityedge_fleet.ratelimit import TokenBucketLimiter

from support.fleet import Api, device_body, make_csr


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


GATE = "enrollment refused"  # the one answer before the gate is passed


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
    """Before the gate the caller learns nothing (``GATE``); the audit row has the reason.
    After it (the token was good) the CSR's fault is told."""
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
        token = _token(api, serial)
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
    if status == 403:
        assert r.json() == {"detail": GATE}
    else:
        assert message in r.text  # a 422's detail is a list of {loc, msg, type}
    last = _enroll_audit(api)[-1]
    assert last.outcome == "refused" and message in last.detail
    if status == 422 or case == "expired":  # the token was not consumed by a refusal
        with Session(api.engine) as s:
            assert all(t.used_at is None for t in s.exec(select(EnrollmentToken)))
    state = api.client.get("/devices/%s" % dev_id, headers=api.headers(Role.viewer)).json()
    assert state["state"] == ("provisioned" if case == "reuse" else "registered")


def claim_for(serial: str) -> str:
    """A claim secret as the vendor makes one: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest(api: Api, manifest: str, claims: dict[str, str]) -> dict[str, object]:
    r = api.client.post("/enrollment/manifests", json={"manifest": manifest, "devices": [
        {"serial": serial, "claim_sha256": sha256_hex(claim)}
        for serial, claim in claims.items()]}, headers=api.headers(Role.technician))
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_allow_listed_serial_enrolls_once_with_its_claim(api: Api) -> None:
    """The attack: the serial is public (a vendor manifest, a label); an attacker posts it
    with a CSR for their own key. Refused, as is a wrong claim and another device's claim;
    the real device then enrolls with its claim, once."""
    dev = _register(api, 3)
    serial = str(dev["serial"])
    claims = {serial: claim_for(serial), "SN-99999": claim_for("SN-99999")}
    got = _manifest(api, "DN-2026-001", claims)
    assert got["added"] == 2 and got["already_listed"] == 0
    attacker_csr, _ = make_csr(str(dev["id"]))
    for claim in (None, "guess-" + "x" * 40, claims["SN-99999"], claims[serial][:-1]):
        body = {"serial": serial, "csr_pem": attacker_csr}
        if claim is not None:
            body["claim"] = claim
        r = api.client.post("/enroll", json=body)
        assert (r.status_code, r.json()) == (403, {"detail": GATE})
    codes = [json.loads(row.detail)["code"] for row in _enroll_audit(api)]
    assert codes == ["claim-missing", "claim-wrong", "claim-wrong", "claim-wrong"]
    state = api.client.get("/devices/%s" % dev["id"], headers=api.headers(Role.viewer))
    assert state.json()["state"] == "registered"
    csr, _ = make_csr(str(dev["id"]))
    ok = api.client.post("/enroll", json={"serial": serial, "claim": claims[serial],
                                          "csr_pem": csr})
    assert ok.status_code == 200, ok.text
    assert '"gate":"allow-list:DN-2026-001"' in _enroll_audit(api)[-1].detail
    again = api.client.post("/enroll", json={"serial": serial, "claim": claims[serial],
                                             "csr_pem": make_csr(str(dev["id"]))[0]})
    assert (again.status_code, again.json()) == (403, {"detail": GATE})
    assert json.loads(_enroll_audit(api)[-1].detail)["code"] == "claim-used"
    with Session(api.engine) as s:  # the claim secret never reaches the log
        for row in s.exec(select(AuditRecord)):
            assert claims[serial] not in row.model_dump_json()


def _expire_token(api: Api, token: str) -> None:
    with Session(api.engine) as s:
        s.execute(update(EnrollmentToken).where(
            col(EnrollmentToken.token_hash) == hash_token(token)).values(
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        s.commit()


def _refusal_cases(api: Api) -> dict[str, tuple[str, dict[str, object]]]:
    """One request per reason a caller without proof is refused: (path, body)."""
    devs = {name: _register(api, i) for i, name in enumerate(
        ("tok", "used", "expired", "listed", "spent", "legacy", "foreign"), 20)}
    serials = {name: str(dev["serial"]) for name, dev in devs.items()}
    tokens = {name: _token(api, serials[name]) for name in ("tok", "used", "expired",
                                                            "foreign")}
    tokens["nobody"] = _token(api, "SN-NOBODY")  # a good token for an unregistered serial
    claims = {name: claim_for(serials[name]) for name in ("listed", "spent")}
    _manifest(api, "DN-R", {serials[n]: c for n, c in claims.items()})
    with Session(api.engine) as s:  # an entry listed before claims existed (migration)
        s.add(AllowedSerial(serial=serials["legacy"], manifest="DN-OLD", added_by="t"))
        s.commit()
    for name, proof in (("used", {"token": tokens["used"]}),
                        ("spent", {"claim": claims["spent"]})):
        r = api.client.post("/enroll", json={"serial": serials[name], "csr_pem": make_csr(
            str(devs[name]["id"]))[0], **proof})
        assert r.status_code == 200, r.text
    _expire_token(api, tokens["expired"])
    enroll, ticket = "/enroll", "/enroll/ticket"
    return {
        "unregistered serial": (enroll, {"serial": "SN-NOBODY", "token": tokens["nobody"]}),
        "unregistered, claim": (enroll, {"serial": "SN-NOBODY", "claim": claims["listed"]}),
        "unknown token": (enroll, {"serial": serials["tok"], "token": "y" * 43}),
        "foreign token": (enroll, {"serial": serials["tok"], "token": tokens["foreign"]}),
        "used token": (enroll, {"serial": serials["used"], "token": tokens["used"]}),
        "expired token": (enroll, {"serial": serials["expired"], "token": tokens["expired"]}),
        "not allow-listed": (enroll, {"serial": serials["tok"]}),
        "missing claim": (enroll, {"serial": serials["listed"]}),
        "wrong claim": (enroll, {"serial": serials["listed"], "claim": claims["spent"]}),
        "used claim": (enroll, {"serial": serials["spent"], "claim": claims["spent"]}),
        "no claim on file": (enroll, {"serial": serials["legacy"], "claim": "anything"}),
        "ticket: unregistered": (ticket, {"serial": "SN-NOBODY", "token": tokens["nobody"]}),
        "ticket: unknown token": (ticket, {"serial": serials["tok"], "token": "y" * 43}),
        "ticket: foreign token": (ticket, {"serial": serials["tok"],
                                           "token": tokens["foreign"]}),
        "ticket: used token, another key": (ticket, {"serial": serials["used"],
                                                     "token": tokens["used"]}),
        "ticket: expired token": (ticket, {"serial": serials["expired"],
                                           "token": tokens["expired"]}),
    }


def _used(api: Api) -> tuple[int, int]:
    with Session(api.engine) as s:
        tokens = sum(1 for t in s.exec(select(EnrollmentToken)) if t.used_at is not None)
        listed = sum(1 for a in s.exec(select(AllowedSerial)) if a.used_at is not None)
    return tokens, listed


def _audit_since(api: Api, after: int) -> list[AuditRecord]:
    with Session(api.engine) as s:
        return list(s.exec(select(AuditRecord).where(col(AuditRecord.id) > after)
                           .order_by(col(AuditRecord.id))))


def _last_audit_id(api: Api) -> int:
    with Session(api.engine) as s:
        last = s.exec(select(AuditRecord).order_by(col(AuditRecord.id).desc())).first()
        return (last.id or 0) if last is not None else 0


def test_every_refusal_before_the_gate_reads_the_same(api: Api) -> None:
    """Enumeration: whatever is wrong (serial unknown, token unknown, foreign, used or
    expired, serial not listed, claim missing, wrong, used or never uploaded), the caller
    gets the same status, headers and body, on both endpoints; each reason is in the audit
    log, and nothing was used up."""
    app: Any = api.client.app
    app.state.enroll_limiter = TokenBucketLimiter(100, 100.0, 10)  # many attempts, one client
    cases = _refusal_cases(api)
    csr = make_csr("urn:dev:mac:0024befffe80ffff")[0]
    used_before = _used(api)
    answers: dict[str, tuple[int, bytes, list[tuple[str, str]]]] = {}
    codes = []
    for name, (path, body) in cases.items():
        after = _last_audit_id(api)
        r = api.client.post(path, json={**body, "csr_pem": csr})
        answers[name] = (r.status_code, r.content,
                         sorted((k, v) for k, v in r.headers.items() if k != "date"))
        rows = _audit_since(api, after)
        assert [row.outcome for row in rows] == ["refused"], name
        codes.append(json.loads(rows[0].detail)["code"])
    assert len(set(map(repr, answers.values()))) == 1, answers
    assert answers["wrong claim"][:2] == (403, b'{"detail":"enrollment refused"}')
    assert sorted(set(codes)) == [
        "claim-missing", "claim-none-on-file", "claim-used", "claim-wrong",
        "not-allow-listed", "token-expired", "token-foreign", "token-unknown",
        "token-used", "unregistered"]
    assert _used(api) == used_before


def test_manifest_claims_are_checked_and_never_replaced(api: Api) -> None:
    tech = api.headers(Role.technician)
    bad = api.client.post("/enrollment/manifests", json={"manifest": "DN-X", "devices": [
        {"serial": "SN-1", "claim_sha256": "Z" * 64}]}, headers=tech)
    assert bad.status_code == 422
    serial_only = api.client.post("/enrollment/manifests", json={"manifest": "DN-X",
                                                                  "serials": ["SN-1"]},
                                  headers=tech)
    assert serial_only.status_code == 422  # a serial alone is not accepted any more
    twice = api.client.post("/enrollment/manifests", json={"manifest": "DN-X", "devices": [
        {"serial": "SN-1", "claim_sha256": "a" * 64},
        {"serial": "SN-1", "claim_sha256": "b" * 64}]}, headers=tech)
    assert twice.status_code == 422 and "listed twice" in twice.text  # detail: a list
    assert _manifest(api, "DN-1", {"SN-1": "one"})["added"] == 1
    assert _manifest(api, "DN-1", {"SN-1": "one"})["already_listed"] == 1
    other = api.client.post("/enrollment/manifests", json={"manifest": "DN-2", "devices": [
        {"serial": "SN-1", "claim_sha256": sha256_hex("two")},
        {"serial": "SN-2", "claim_sha256": sha256_hex("three")}]}, headers=tech)
    assert other.status_code == 409 and "SN-1" in other.json()["detail"]
    with Session(api.engine) as s:
        row = s.get(AllowedSerial, "SN-1")
        assert row is not None and row.claim_hash == sha256_hex("one")
        assert s.get(AllowedSerial, "SN-2") is None  # the whole upload was rolled back
        s.add(AllowedSerial(serial="SN-OLD", manifest="DN-OLD", added_by="t"))
        s.commit()
    assert _manifest(api, "DN-3", {"SN-OLD": "old"})["added"] == 1  # gains its claim
    with Session(api.engine) as s:
        legacy = s.get(AllowedSerial, "SN-OLD")
        assert legacy is not None and legacy.claim_hash == sha256_hex("old")


def csr_with_foreign_key(cn: str, victim: ec.EllipticCurvePrivateKey) -> str:
    """A CSR signed by an attacker's key whose public key is swapped for the victim's (the
    same length, so the DER stays well-formed; the signature no longer verifies)."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    der = x509.load_pem_x509_csr(make_csr(cn, attacker)[0].encode()).public_bytes(
        serialization.Encoding.DER)

    def point(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)

    assert der.count(point(attacker)) == 1
    forged = x509.load_der_x509_csr(der.replace(point(attacker), point(victim)))
    return forged.public_bytes(serialization.Encoding.PEM).decode()


def test_a_used_ticket_token_with_an_unsigned_csr_gets_nothing(api: Api) -> None:
    """Finding: /enroll/ticket compared the CSR's public key without checking its
    signature, so the holder of a used token could put the enrolled device's public key
    into an unsigned CSR and be answered with that device's certificate and config."""
    dev = _register(api, 40)
    token = _token(api, str(dev["serial"]))
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr, _ = make_csr(str(dev["id"]), device_key)
    first = api.client.post("/enroll/ticket", json={"serial": dev["serial"], "token": token,
                                                    "csr_pem": csr})
    assert first.status_code == 200 and first.headers["X-Cityedge-Enrollment"] == "issued"
    forged = csr_with_foreign_key(str(dev["id"]), device_key)
    assert not x509.load_pem_x509_csr(forged.encode()).is_signature_valid
    r = api.client.post("/enroll/ticket", json={"serial": dev["serial"], "token": token,
                                                "csr_pem": forged})
    assert (r.status_code, r.json()) == (403, {"detail": GATE})
    assert "BEGIN CERTIFICATE" not in r.text
    # the device itself (a CSR signed by its key) still gets its certificate again
    again = api.client.post("/enroll/ticket", json={
        "serial": dev["serial"], "token": token,
        "csr_pem": make_csr(str(dev["id"]), device_key)[0]})
    assert again.status_code == 200 and again.headers["X-Cityedge-Enrollment"] == "existing"
    assert again.json()["certificate_pem"] == first.json()["certificate_pem"]


def test_a_key_enrolled_for_one_device_is_a_409_for_another(api: Api) -> None:
    """Finding: a second device enrolling with an already enrolled key hit the credential
    table's unique kid: an unhandled 500 and no audit row. Now 409, audited, nothing used."""
    one, two = _register(api, 41), _register(api, 42)
    key = ec.generate_private_key(ec.SECP256R1())
    ok = api.client.post("/enroll", json={"serial": one["serial"], "token": _token(
        api, str(one["serial"])), "csr_pem": make_csr(str(one["id"]), key)[0]})
    assert ok.status_code == 200
    token = _token(api, str(two["serial"]))
    client = TestClient(api.client.app, raise_server_exceptions=False)
    r = client.post("/enroll", json={"serial": two["serial"], "token": token,
                                     "csr_pem": make_csr(str(two["id"]), key)[0]})
    assert r.status_code == 409, r.text
    assert "is already enrolled" in r.json()["detail"] and str(one["id"]) not in r.text
    last = _enroll_audit(api)[-1]
    assert last.outcome == "refused" and json.loads(last.detail)["code"] == "key-taken"
    assert str(one["id"]) in last.detail
    with Session(api.engine) as s:
        row = s.exec(select(EnrollmentToken).where(
            col(EnrollmentToken.token_hash) == hash_token(token))).one()
        assert row.used_at is None  # rolled back: the token still works with a new key
    fresh = api.client.post("/enroll", json={"serial": two["serial"], "token": token,
                                             "csr_pem": make_csr(str(two["id"]))[0]})
    assert fresh.status_code == 200, fresh.text


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


GATE_STATES = list(itertools.product(
    (False, True),  # the serial is registered
    ("none", "valid", "foreign", "used", "expired", "unknown"),  # the token presented
    ("no", "claim", "no-claim-on-file", "spent"),  # the serial's allow-list entry
    ("none", "right", "wrong")))  # the claim presented


def test_the_gate_admits_exactly_the_proven(api: Api) -> None:
    """Every mix (all 144) of registration, token state, allow-list state and presented
    claim: the device enrolls iff it is registered and holds a valid token or (no token)
    the unused claim of its allow-list entry; every other answer is the one refusal."""
    app: Any = api.client.app
    app.state.enroll_limiter = TokenBucketLimiter(1000, 1000.0, 10)
    admitted = 0
    for i, (registered, token, listed, claim) in enumerate(GATE_STATES, 100):
        dev = device_body(i)
        serial, dev_id = str(dev["serial"]), str(dev["id"])
        if registered:
            _register(api, i)
        secret = claim_for(serial)
        if listed != "no":
            with Session(api.engine) as s:
                s.add(AllowedSerial(
                    serial=serial, manifest="DN-P", added_by="t",
                    claim_hash=None if listed == "no-claim-on-file" else sha256_hex(secret),
                    used_at=dt.datetime.now(dt.UTC) if listed == "spent" else None))
                s.commit()
        body: dict[str, object] = {"serial": serial, "csr_pem": make_csr(dev_id)[0]}
        if token != "none":
            with Session(api.engine) as s:
                row, tok = enrollment.issue_token(
                    s, serial="SN-ELSE" if token == "foreign" else serial, ttl_s=600,
                    created_by="t")
                if token == "used":
                    row.used_at = dt.datetime.now(dt.UTC)
                if token == "expired":
                    row.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
                s.add(row)
                s.commit()
            body["token"] = "z" * 43 if token == "unknown" else tok
        if claim != "none":
            body["claim"] = secret if claim == "right" else claim_for(serial)
        r = api.client.post("/enroll", json=body)
        proven = token == "valid" if token != "none" else (
            listed == "claim" and claim == "right")
        case = (registered, token, listed, claim)
        if registered and proven:
            assert r.status_code == 200, (case, r.text)
            admitted += 1
        else:
            assert (r.status_code, r.json()) == (403, {"detail": GATE}), case
    assert admitted == 1 * 1 * 4 * 3 + 1 * 1 * 1 * 1  # valid token: any listing or claim
