"""The ingest decision per message, against SQLite and PostgreSQL: chain statuses, stored
readings with provenance, topic/signer mismatch, forgeries (pycose) and quarantine."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, select

from cityedge_core import batch as batchmod
from cityedge_core import chain
from cityedge_fleet import ingest
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import (
    AuditRecord,
    Credential,
    CredentialStatus,
    IngestEvent,
    Reading,
    Role,
)
from cityedge_fleet.ratelimit import TokenBucketLimiter
from cityedge_host.crypto import EcSigner

from support.fleet import Api, enroll_device, forgery, records


def test_in_order_batches_are_stored_with_provenance(api: Api) -> None:
    dev = enroll_device(api, 1)
    ing = Ingestor(api.engine, api.settings)
    outcomes = [ing.handle(dev.topic, dev.sign(3)) for _ in range(4)]
    assert [o.status for o in outcomes] == ["ok"] * 4
    assert sum(o.readings for o in outcomes) == 12
    viewer = api.headers(Role.viewer)
    got = api.client.get("/devices/%s" % dev.id, headers=viewer).json()
    assert got["state"] == "active" and got["last_seen"] is not None
    assert got["chain"] == {"last_seq": 4, "missing": 0, "forgotten": 0}
    rows = api.client.get("/devices/%s/readings" % dev.id, params={"limit": 500},
                          headers=viewer).json()
    assert len(rows) == 12
    assert {r["batch_seq"] for r in rows} == {1, 2, 3, 4}
    assert rows[0] == {"t": 1_790_000_000.0, "name": "pm25-0", "unit": "ug/m3", "value": 1.5,
                       "vs": None, "vb": None, "vd": None, "sum": None, "batch_seq": 1,
                       "status": "ok", "timebase": 0, "via": None}
    window = api.client.get("/devices/%s/readings" % dev.id, headers=viewer, params={
        "since": "2026-09-21T14:13:21Z", "until": "2026-09-21T14:13:22Z"}).json()
    assert {r["t"] for r in window} == {1_790_000_001.0}


def test_gap_duplicate_reorder_replay_and_drop_records(api: Api) -> None:
    dev = enroll_device(api, 2)
    ing = Ingestor(api.engine, api.settings)
    b1, b2, b3, b4 = (dev.sign(1) for _ in range(4))
    assert ing.handle(dev.topic, b1).status == chain.OK
    assert ing.handle(dev.topic, b1).status == chain.DUPLICATE
    assert ing.handle(dev.topic, b4).status == chain.GAP
    assert ing.handle(dev.topic, b2).status == chain.REORDERED
    assert ing.handle(dev.topic, b2).status == chain.DUPLICATE
    drop = dev.writer.sign([], boot=1, kind=batchmod.KIND_DROP, dropped=[3, 3, 1, 1])
    assert ing.handle(dev.topic, drop).status == chain.OK
    assert ing.handle(dev.topic, b3).status == chain.REPLAY  # explained as dropped
    with Session(api.engine) as s:
        events = [(e.status, e.seq, e.missing, e.explained) for e in s.exec(
            select(IngestEvent).where(IngestEvent.device_id == dev.id)
            .order_by(IngestEvent.id))]  # type: ignore[arg-type]
        stored = sorted(r.batch_seq for r in s.exec(select(Reading).where(
            Reading.device_id == dev.id)))
    assert events == [("duplicate", 1, 0, 0), ("gap", 4, 2, 0), ("reordered", 2, 0, 0),
                      ("duplicate", 2, 0, 0), ("drop", 5, 0, 1), ("replay", 3, 0, 0)]
    assert stored == [1, 2, 4]


def test_topic_must_name_the_signer(api: Api) -> None:
    a = enroll_device(api, 3)
    b = enroll_device(api, 4)
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(b.topic, a.sign()).status == ingest.TOPIC_MISMATCH
    assert ing.handle("ce/v1/urn:dev:mac:00000000ffff/up/readings", a.sign()).status == (
        ingest.UNKNOWN_DEVICE)
    assert ing.handle("ce/v1/x/up/status", a.sign()).status == ingest.BAD_TOPIC
    assert ing.handle(a.topic, b"\xd2\x84garbage").status == chain.MALFORMED
    stranger = EcSigner.generate()
    w = batchmod.BatchWriter(a.id, stranger, stranger.kid)
    assert ing.handle(a.topic, w.sign(records(1), boot=1)).status == chain.UNKNOWN_KEY
    with Session(api.engine) as s:
        assert s.exec(select(Reading)).first() is None


def test_repeated_forgeries_quarantine_the_device(api: Api) -> None:
    dev = enroll_device(api, 5)
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(dev.topic, dev.sign()).status == chain.OK
    kid = dev.signer.kid
    limit = api.settings.limits.quarantine_after_forgeries
    for i in range(limit):
        assert ing.handle(dev.topic, forgery(kid, dev.id, 2 + i)).status == (
            chain.BAD_SIGNATURE)
    viewer = api.headers(Role.viewer)
    got = api.client.get("/devices/%s" % dev.id, headers=viewer).json()
    assert got["state"] == "quarantined" and got["forgeries"] == limit
    assert ing.handle(dev.topic, dev.sign()).status == ingest.NOT_ACCEPTING
    with Session(api.engine) as s:
        q = s.exec(select(AuditRecord).where(AuditRecord.action == "device.quarantine")).all()
    assert len(q) == 1 and q[0].target == dev.id
    # the security team lets it back in; the chain continues where it was
    r = api.client.post("/devices/%s/state" % dev.id, json={"state": "active"},
                        headers=api.headers(Role.security))
    assert r.status_code == 200 and r.json()["forgeries"] == 0
    assert ing.handle(dev.topic, dev.sign()).status == chain.GAP  # seq 2 was never accepted


def test_revoked_credential_is_refused_and_published_in_the_crl(api: Api) -> None:
    from cryptography import x509

    dev = enroll_device(api, 6)
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(dev.topic, dev.sign()).status == chain.OK
    sec = api.headers(Role.security)
    cred = api.client.get("/devices/%s/credentials" % dev.id, headers=sec).json()[0]
    r = api.client.post("/devices/%s/credentials/%s/revoke" % (dev.id, cred["serial"]),
                        headers=sec)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    crl = x509.load_pem_x509_crl(api.client.get("/ca/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(int(cred["serial"], 16)) is not None
    assert ing.handle(dev.topic, dev.sign()).status == chain.OK  # cached key, still fresh
    later = time.monotonic() + api.settings.limits.keyring_max_age_s
    ing.keyring.clock = lambda: later  # time passes: the cached key is checked again
    assert ing.handle(dev.topic, dev.sign()).status == chain.UNKNOWN_KEY


def test_key_cache_reads_the_keys_a_group_uses_not_the_registry(api: Api) -> None:
    """The worker's key cache holds the kids its groups used, each checked within
    ``keyring_max_age_s``: a fleet of many devices is never read whole (docs/CAPACITY.md,
    C9: the whole registry every 5 s held every transaction at 10,000 devices)."""
    devs = [enroll_device(api, n) for n in range(20, 25)]
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle_many([(d.topic, d.sign()) for d in devs[:2]])[-1].status == chain.OK
    assert sorted(e.device for e, _key, _t in ing.keyring.entries.values()) == sorted(
        d.id for d in devs[:2])
    later = time.monotonic() + api.settings.limits.keyring_max_age_s
    ing.keyring.clock = lambda: later  # both entries are stale now: checked again
    assert ing.handle(devs[2].topic, devs[2].sign()).status == chain.OK
    assert ing.handle(devs[0].topic, devs[0].sign()).status == chain.OK
    assert len(ing.keyring.entries) == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(order=st.lists(st.integers(0, 7), min_size=1, max_size=14))
def test_any_delivery_order_stores_each_valid_batch_once(api: Api, order: list[int]) -> None:
    """Deliver 8 batches in any order with repeats: every batch delivered is stored once,
    and the statuses match a model of the chain."""
    n = getattr(test_any_delivery_order_stores_each_valid_batch_once, "_n", 0) + 1
    test_any_delivery_order_stores_each_valid_batch_once._n = n  # type: ignore[attr-defined]
    api.client.app.state.enroll_limiter = TokenBucketLimiter(  # type: ignore[attr-defined]
        1000, 1000.0, 10)
    dev = enroll_device(api, 100 + n)
    batches = [dev.sign(2) for _ in range(8)]
    ing = Ingestor(api.engine, api.settings)
    seen: set[int] = set()
    last = 0
    for idx in order:
        status = ing.handle(dev.topic, batches[idx]).status
        seq = idx + 1
        if seq in seen:
            expected = chain.DUPLICATE
        elif seq == last + 1:
            expected = chain.OK  # its prev is the hash of batch seq - 1, the last one
        elif seq > last:
            expected = chain.GAP
        else:
            expected = chain.REORDERED
        assert status == expected, (order, idx, status)
        seen.add(seq)
        last = max(last, seq)
    with Session(api.engine) as s:
        stored = [r.batch_seq for r in s.exec(select(Reading).where(
            Reading.device_id == dev.id))]
    assert sorted(stored) == sorted(seq for seq in seen for _ in range(2))


def test_since_boot_readings_are_kept_but_not_in_time_windows(api: Api) -> None:
    dev = enroll_device(api, 7)
    ing = Ingestor(api.engine, api.settings)
    no_clock = dev.writer.sign([{0: "t", 2: 21.5, 6: 12.0}], boot=3,
                               timebase=batchmod.TIME_SINCE_BOOT)
    assert ing.handle(dev.topic, no_clock).status == chain.OK
    viewer = api.headers(Role.viewer)
    url = "/devices/%s/readings" % dev.id
    rows = api.client.get(url, headers=viewer).json()
    assert [(r["t"], r["timebase"], r["value"]) for r in rows] == [(12.0, 1, 21.5)]
    windowed = api.client.get(url, headers=viewer, params={"since": "1970-01-01T00:00:00Z"})
    assert windowed.json() == []


def test_device_enrolled_after_the_worker_started_is_accepted(api: Api) -> None:
    ing = Ingestor(api.engine, api.settings)
    first = enroll_device(api, 8)
    assert ing.handle(first.topic, first.sign()).status == chain.OK  # loads the keyring
    late = enroll_device(api, 9)  # enrolled a moment later: the cache is fresh, not stale
    assert ing.handle(late.topic, late.sign()).status == chain.OK
    unknown = enroll_device(api, 10)
    with Session(api.engine) as s:  # its credential is revoked before it ever sends
        cred = s.exec(select(Credential).where(Credential.device_id == unknown.id)).one()
        cred.status = CredentialStatus.revoked
        s.add(cred)
        s.commit()
    assert ing.handle(unknown.topic, unknown.sign()).status == chain.UNKNOWN_KEY
