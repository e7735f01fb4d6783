"""Key rotation and emergency revocation end to end: real Mosquitto (mTLS, the fleet's CRL,
dynamic security), the real fleet (API, ingest worker, command publisher) on SQLite and
PostgreSQL, and a fast CPython device (``cityedge.fastdevice``: the shared core over
aiomqtt) that streams all along. Rotated while it streams: no batch lost or refused, the
chain unbroken across the key change, the old key gone from its disk, and the broker
refuses the old certificate afterwards. Revoked: the broker refuses the device's reconnect
and the ingest refuses its batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlmodel import Session, col, func, select

from cityedge_core import chain
from cityedge_fleet import rotation_ingest
from cityedge_fleet.models import ChainStateRow, IngestEvent, Reading, Role
from cityedge_host.mqtt_client import CLOSED_BEFORE_CONNACK

from support.fastfleet import DeviceLoop, Fleet, enroll_fast, real_fleet, refused_at_the_broker
from support.fleet import wait_for
from support.mosquitto import TestPKI
from support.mqtt_probe import WAIT_S


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet(db_url, pki) as f:
        yield f


def rotation_state(f: Fleet, device: str) -> str:
    rows = f.api.client.get("/devices/%s/rotations" % device,
                            headers=f.api.headers(Role.viewer)).json()
    return str(rows[0]["state"]) if rows else "-"


def stored(f: Fleet, device: str) -> tuple[int, int, int]:
    """(distinct batches with readings, last seq on the chain, gaps still missing)."""
    with Session(f.api.engine) as s:
        batches = s.exec(select(func.count(func.distinct(Reading.batch_seq))).where(
            col(Reading.device_id) == device)).one()
        row = s.get(ChainStateRow, device)
        assert row is not None
        return int(batches), row.last_seq, row.missing


def events(f: Fleet, device: str) -> list[str]:
    with Session(f.api.engine) as s:
        return [e.status for e in s.exec(select(IngestEvent).where(
            col(IngestEvent.device_id) == device))]


def test_a_streaming_fast_device_is_rotated_without_losing_a_batch(fleet: Fleet) -> None:
    f = fleet
    dev, first = enroll_fast(f, 1)
    old_kid = dev.signer.kid.hex()
    loop = DeviceLoop([dev]).start()
    try:
        assert wait_for(lambda: stored(f, dev.id)[1] >= 3, WAIT_S)  # streaming, active
        r = f.api.client.post("/devices/%s/rotate" % dev.id,
                              headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        assert wait_for(lambda: rotation_state(f, dev.id) == "old-revoked", 3 * WAIT_S), \
            rotation_state(f, dev.id)
        seq_at_switch = dev.writer.seq
        assert wait_for(lambda: stored(f, dev.id)[1] >= seq_at_switch + 3, WAIT_S)
        loop.call(lambda: setattr(dev, "sampling", False))
        assert wait_for(lambda: not dev.outbox and stored(f, dev.id)[1] == dev.writer.seq,
                        WAIT_S)
    finally:
        loop.stop()
    batches, last, missing = stored(f, dev.id)
    assert (batches, last, missing) == (dev.writer.seq, dev.writer.seq, 0)  # none lost
    # nothing refused, no gap or fork: besides the CSR taken, only duplicates (a batch
    # re-sent after the switch's reconnect) may be recorded
    assert set(events(f, dev.id)) <= {chain.DUPLICATE, rotation_ingest.CSR_TAKEN}
    assert events(f, dev.id).count(rotation_ingest.CSR_TAKEN) == 1
    assert (dev.stats.rotations, dev.stats.erased) == (1, 1)
    assert dev.stats.forged == 0 and dev.stats.refused == 0
    assert list(dev.key_slots().values()) == [dev.signer.kid.hex()] != [old_kid]  # old gone
    assert dev.stats.connects == 2  # the switch's reconnect, nothing else
    # the broker refuses the old certificate now (the CRL was re-signed and reloaded)
    assert refused_at_the_broker(f, first)


def test_a_revoked_device_is_refused_by_the_broker_and_the_ingest(fleet: Fleet) -> None:
    f = fleet
    dev, first = enroll_fast(f, 2)
    loop = DeviceLoop([dev]).start()
    try:
        assert wait_for(lambda: stored(f, dev.id)[1] >= 2, WAIT_S)
        r = f.api.client.post("/devices/%s/revoke" % dev.id,
                              json={"reason": "key-compromise"},
                              headers=f.api.headers(Role.security))
        assert r.status_code == 200, r.text
        assert r.json()["broker_cut"] is True
        # cut and kicked: its reconnects fail from now on
        failures = dev.stats.connect_failures
        assert wait_for(lambda: dev.stats.connect_failures >= failures + 2, WAIT_S)
        # refused after the TLS handshake: the connect fails on the close, not by
        # waiting out its timeout (which aiomqtt alone did)
        assert CLOSED_BEFORE_CONNACK in dev.stats.last_error, dev.stats.last_error
        last = stored(f, dev.id)[1]
    finally:
        loop.stop()
    assert refused_at_the_broker(f, first)
    assert stored(f, dev.id)[1] == last  # nothing stored after the revocation


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_many_fast_devices_in_one_process_rotate_together(fleet: Fleet) -> None:
    """Twenty fast devices on one asyncio loop, rotated at the same moment: every one ends
    ``old-revoked`` on its new key, with its chain whole."""
    f = fleet
    devs = [enroll_fast(f, 10 + i, interval_s=0.5)[0] for i in range(20)]
    loop = DeviceLoop(devs).start()
    try:
        assert wait_for(lambda: all(stored(f, d.id)[1] >= 1 for d in devs), WAIT_S)
        for d in devs:
            r = f.api.client.post("/devices/%s/rotate" % d.id,
                                  headers=f.api.headers(Role.security))
            assert r.status_code == 201, r.text
        assert wait_for(lambda: all(rotation_state(f, d.id) == "old-revoked" for d in devs),
                        3 * WAIT_S), [rotation_state(f, d.id) for d in devs]
        for d in devs:
            loop.call(lambda d=d: setattr(d, "sampling", False))
        assert wait_for(lambda: all(not d.outbox and stored(f, d.id)[1] == d.writer.seq
                                    for d in devs), WAIT_S)
    finally:
        loop.stop()
    for d in devs:
        assert stored(f, d.id) == (d.writer.seq, d.writer.seq, 0)
        assert (d.stats.rotations, d.stats.erased) == (1, 1)
        assert len(d.key_slots()) == 1
