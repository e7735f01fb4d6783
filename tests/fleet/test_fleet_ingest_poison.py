"""A validly signed batch whose SenML the database cannot store (a bignum, a NUL, text longer
than its column, NaN or infinity, a resolved sum that overflows) is ``malformed``: recorded
as an event, its readings not stored, and every other device's batches in the same group and
in later groups stored. On SQLite and PostgreSQL, signed by real enrolled devices' keys."""

from __future__ import annotations

import pytest
from sqlmodel import Session, col, select

from cityedge_core import chain, limits, senml
from cityedge_fleet import ingest
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import (
    AuditRecord,
    ChainStateRow,
    Device,
    IngestEvent,
    Reading,
    Role,
)

from support.fleet import NAME, POISON, T0, UNIT, Api, enroll_device


def _stored(api: Api, device: str) -> list[tuple[int, str]]:
    with Session(api.engine) as s:
        return sorted((r.batch_seq, r.status) for r in s.exec(
            select(Reading).where(Reading.device_id == device)))


@pytest.mark.parametrize("kind", sorted(POISON))
def test_a_poison_batch_is_malformed_and_holds_back_nobody(api: Api, kind: str) -> None:
    a, p, b = enroll_device(api, 1), enroll_device(api, 2), enroll_device(api, 3)
    ing = Ingestor(api.engine, api.settings)
    poison = p.writer.sign(POISON[kind], boot=1)
    first = ing.handle_many([(a.topic, a.sign(2)), (p.topic, poison), (b.topic, b.sign(2))])
    assert [o.status for o in first] == [chain.OK, chain.MALFORMED, chain.OK]
    later = ing.handle_many([(a.topic, a.sign(2)), (b.topic, b.sign(2)),
                             (p.topic, p.sign(1))])
    assert [o.status for o in later[:2]] == [chain.OK, chain.OK]
    # the poisoned device's next batch is stored too (a gap if the chain kept the poison's
    # seq: it was signed, only its content refused)
    assert later[2].status in (chain.OK, chain.GAP)
    assert _stored(api, a.id) == [(1, "ok"), (1, "ok"), (2, "ok"), (2, "ok")]
    assert _stored(api, b.id) == [(1, "ok"), (1, "ok"), (2, "ok"), (2, "ok")]
    assert _stored(api, p.id) == [(2, later[2].status)]
    with Session(api.engine) as s:
        events = s.exec(select(IngestEvent).where(IngestEvent.device_id == p.id)
                        .order_by(col(IngestEvent.id))).all()
    assert events[0].status == chain.MALFORMED and events[0].detail.startswith("SenML")


def test_the_longest_resolved_name_and_unit_are_stored(api: Api) -> None:
    """bn + n may be DEVICE_ID_MAX_CHARS + SENML_NAME_MAX_CHARS characters: the column
    holds them (PostgreSQL enforces varchar widths, SQLite does not)."""
    dev = enroll_device(api, 4)
    ing = Ingestor(api.engine, api.settings)
    name = ("b" * NAME, "n" * UNIT)
    recs = [{senml.BN: name[0], senml.BT: T0, senml.N: name[1], senml.U: "\u00b5" * UNIT,
             senml.V: 1.5}, {senml.N: "v", senml.VS: "\u00e9\u00a0" * 128}]
    assert ing.handle(dev.topic, dev.writer.sign(recs, boot=1)).status == chain.OK
    with Session(api.engine) as s:
        rows = s.exec(select(Reading).order_by(col(Reading.id))).all()
    assert [len(r.name) for r in rows] == [NAME + UNIT, NAME + 1]
    assert rows[0].unit == "\u00b5" * UNIT and rows[1].vs == "\u00e9\u00a0" * 128


def test_a_sequence_jump_to_the_largest_seq_is_recorded(api: Api) -> None:
    """A device may jump its seq to ``SEQ_MAX``: the gap it reports (2**48 missing) and
    the chain summary are stored as 64-bit counts, not refused by a 32-bit column."""
    dev = enroll_device(api, 5)
    other = enroll_device(api, 6)
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(dev.topic, dev.sign(1)).status == chain.OK
    dev.writer.seq = limits.SEQ_MAX - 1
    out = ing.handle_many([(dev.topic, dev.sign(1)), (other.topic, other.sign(1))])
    assert [o.status for o in out] == [chain.GAP, chain.OK]
    with Session(api.engine) as s:
        gap = s.exec(select(IngestEvent).where(IngestEvent.status == chain.GAP)).one()
        state = s.get(ChainStateRow, dev.id)
    assert gap.missing == limits.SEQ_MAX - 2
    assert state is not None and state.missing == limits.SEQ_MAX - 2


def test_repeated_malformed_batches_quarantine_the_device(api: Api) -> None:
    """Like forgeries: a device that keeps publishing what the core refuses (garbage, or
    signed SenML out of bounds) is quarantined after ``quarantine_after_malformed`` (an
    audit record), and reactivation by the security team clears the count."""
    dev, other = enroll_device(api, 7), enroll_device(api, 8)
    ing = Ingestor(api.engine, api.settings)
    limit = api.settings.limits.quarantine_after_malformed
    assert ing.handle(dev.topic, dev.sign(1)).status == chain.OK
    bad = [b"\xd2\x84garbage"] + [dev.writer.sign(POISON["nan"], boot=1)
                                  for _ in range(limit - 2)]
    out = ing.handle_many([(dev.topic, m) for m in bad] + [(other.topic, other.sign(1))])
    assert [o.status for o in out] == [chain.MALFORMED] * (limit - 1) + [chain.OK]
    viewer = api.headers(Role.viewer)
    got = api.client.get("/devices/%s" % dev.id, headers=viewer).json()
    assert (got["state"], got["malformed"]) == ("active", limit - 1)
    last = ing.handle_many([(dev.topic, dev.writer.sign(POISON["value-overflow"], boot=1)),
                            (dev.topic, dev.sign(1))])
    assert [o.status for o in last] == [chain.MALFORMED, ingest.NOT_ACCEPTING]
    got = api.client.get("/devices/%s" % dev.id, headers=viewer).json()
    assert (got["state"], got["malformed"], got["forgeries"]) == ("quarantined", limit, 0)
    with Session(api.engine) as s:
        q = s.exec(select(AuditRecord).where(AuditRecord.action == "device.quarantine")).all()
    assert [(r.target, r.actor, r.detail) for r in q] == [
        (dev.id, "ingest", '{"malformed":%d}' % limit)]
    r = api.client.post("/devices/%s/state" % dev.id, json={"state": "active"},
                        headers=api.headers(Role.security))
    assert r.status_code == 200 and r.json()["malformed"] == 0
    assert ing.handle(dev.topic, dev.sign(1)).status in (chain.OK, chain.GAP)
    assert api.client.get("/devices/%s" % other.id, headers=viewer).json()["malformed"] == 0


def test_a_relayed_malformed_batch_counts_against_the_gateway(api: Api) -> None:
    gw = enroll_device(api, 9)
    node = enroll_device(api, 10, gateway=gw.id)
    ing = Ingestor(api.engine, api.settings)
    relay = "ce/v1/%s/up/relay" % gw.id
    out = ing.handle(relay, node.writer.sign(POISON["nul-in-vs"], boot=1))
    assert (out.status, out.device, out.via) == (chain.MALFORMED, node.id, gw.id)
    out = ing.handle(relay, node.writer.sign(POISON["time-overflow"], boot=1))  # resolution
    assert (out.status, out.device, out.via) == (chain.MALFORMED, node.id, gw.id)
    with Session(api.engine) as s:
        assert s.get(Device, gw.id).malformed == 2  # type: ignore[union-attr]
        assert s.get(Device, node.id).malformed == 0  # type: ignore[union-attr]
        events = s.exec(select(IngestEvent).where(IngestEvent.device_id == node.id)).all()
    assert [e.status for e in events] == [chain.MALFORMED] * 2
    assert all(gw.id in e.detail for e in events)


def test_a_topic_level_that_is_not_a_device_urn_is_a_bad_topic(api: Api) -> None:
    """The publisher level must be a device URN: anything else is ignored, never an event
    row keyed by unbounded text (PostgreSQL refused a device id over 128 characters, and
    with it the whole group)."""
    dev = enroll_device(api, 11)
    ing = Ingestor(api.engine, api.settings)
    batch = dev.sign(1)
    topics = ["ce/v1/%s/up/readings" % ("urn:dev:mac:" + "a" * 200), "ce/v1/x/up/readings",
              "ce/v1/urn:dev:mac:00 11/up/relay", "ce/v1/urn:dev:mac:0\x00/up/readings",
              "ce/v1//up/readings"]
    out = ing.handle_many([(t, batch) for t in topics] + [(dev.topic, batch)])
    assert [o.status for o in out] == [ingest.BAD_TOPIC] * len(topics) + [chain.OK]
    assert ing.handle("ce/v1/urn:dev:mac:00000000ffff/up/readings", batch).status == (
        ingest.UNKNOWN_DEVICE)  # a device URN nobody registered: an event, bounded
    with Session(api.engine) as s:
        assert [e.status for e in s.exec(select(IngestEvent))] == [ingest.UNKNOWN_DEVICE]
