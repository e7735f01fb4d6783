"""A device's signed result of a fleet command, through the real ingest on SQLite and
PostgreSQL: taken only when the device's own key signed it, on its own topic, for a
command of that device with that seq and name; recorded on the command and audited. A
forged result, another device's, one for an unknown seq or another command, a second
different answer are refused and recorded as events; forgeries count toward quarantine.
A device back after a silence has its unanswered commands sent again at once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_core import cbor, chain, command, cose, topics
from cityedge_fleet import acceptance, command_queue
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import (
    AuditRecord,
    Device,
    FleetCommand,
    IngestEvent,
    Role,
    utcnow,
)
from cityedge_host.crypto import EcSigner

from support.fleet import Api, EnrolledDevice, enroll_device


def result_topic(device: str) -> str:
    return topics.up(device, topics.RESULT)


def answer(dev: EnrolledDevice, seq: int, outcome: str = "ok", name: str = "status",
           detail: str = "done", data: Any = None, device: str | None = None,
           signer: EcSigner | None = None, kid: bytes | None = None) -> bytes:
    s = signer or dev.signer
    return command.encode_result(s, kid or dev.signer.kid, name, device or dev.id, seq,
                                 outcome, detail, data)


def queue(api: Api, device: str, name: str = "status") -> dict[str, Any]:
    r = api.client.post("/devices/%s/commands" % device, json={"name": name},
                        headers=api.headers(Role.security))
    assert r.status_code == 201, r.text
    return dict(r.json())


def state(api: Api, command_id: int) -> dict[str, Any]:
    return dict(api.client.get("/commands/%d" % command_id,
                               headers=api.headers(Role.viewer)).json())


def events(api: Api, device: str) -> list[tuple[str, int | None]]:
    with Session(api.engine) as s:
        rows = s.exec(select(IngestEvent).where(IngestEvent.device_id == device)
                      .order_by(col(IngestEvent.id))).all()
    return [(e.status, e.seq) for e in rows]


def test_a_devices_own_result_is_recorded_once_and_audited(api: Api) -> None:
    a = enroll_device(api, 1)
    cmd = queue(api, a.id)
    ing = Ingestor(api.engine, api.settings)
    data = {"uptime_s": 42, "raw": b"\x01\x02"}
    out = ing.handle(result_topic(a.id), answer(a, cmd["seq"], data=data))
    assert (out.status, out.device) == (acceptance.RESULT, a.id)
    got = state(api, cmd["id"])
    assert (got["state"], got["result_detail"], got["finished_by"]) == (
        "ok", "done", "device:%s" % a.id)
    assert got["result_data"] == {"uptime_s": 42, "raw": "0102"}
    assert got["result_at"] is not None
    # the same answer again (to a re-sent command): ignored, nothing recorded
    assert ing.handle(result_topic(a.id), answer(a, cmd["seq"], data=data)).status == (
        acceptance.RESULT_DUPLICATE)
    # a different answer to an answered command: kept aside as an event, the first stands
    assert ing.handle(result_topic(a.id), answer(a, cmd["seq"], "failed")).status == (
        acceptance.RESULT_CONFLICT)
    assert state(api, cmd["id"])["state"] == "ok"
    assert events(api, a.id) == [(acceptance.RESULT_CONFLICT, cmd["seq"])]
    with Session(api.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "command.result")).all()
        stored = s.get(FleetCommand, cmd["id"])
        assert stored is not None and stored.result_signed is not None
        # the signed answer is kept: anyone can check it against the device's key later
        msg = cose.decode_sign1(stored.result_signed)
        msg.verify(a.signer.verifier())
    assert [(r.actor, r.target, r.outcome) for r in rows] == [
        ("device:%s" % a.id, a.id, "ok")]
    assert '"outcome":"ok"' in rows[0].detail and '"was":"queued"' in rows[0].detail


def test_forged_foreign_and_unknown_results_are_refused_and_recorded(api: Api) -> None:
    a = enroll_device(api, 2)
    b = enroll_device(api, 3)
    cmd_a = queue(api, a.id)
    cmd_b = queue(api, b.id)
    ing = Ingestor(api.engine, api.settings)
    rogue = EcSigner.generate()
    topic_a = result_topic(a.id)
    cases = [
        # signed by another key claiming a's kid: a forgery, counted against a
        (topic_a, answer(a, cmd_a["seq"], signer=rogue), chain.BAD_SIGNATURE),
        # b's genuine answer to its own command, published on a's topic (the broker
        # refuses that already; the ingest too)
        (topic_a, answer(b, cmd_b["seq"]), acceptance.TOPIC_MISMATCH),
        # b signs a result naming a, on its own topic: b may not answer for a
        (result_topic(b.id), answer(b, cmd_a["seq"], device=a.id), chain.BAD_SIGNATURE),
        # a key the fleet does not know
        (topic_a, answer(a, cmd_a["seq"], signer=rogue, kid=rogue.kid), chain.UNKNOWN_KEY),
        # a's own key, but a seq never sent to a, or another command's name
        (topic_a, answer(a, 99), acceptance.UNKNOWN_COMMAND),
        (topic_a, answer(a, cmd_a["seq"], name="rotate"), acceptance.RESULT_MISMATCH),
        # not a COSE_Sign1; a signed payload that is no result
        (topic_a, b"\xd2\x84garbage", chain.MALFORMED),
        (topic_a, cose.encode_sign1(cbor.dumps({1: "status", 2: a.id, 3: 1, 4: "maybe"}),
                                    a.signer, a.signer.kid), chain.MALFORMED),
    ]
    for topic, data, expected in cases:
        assert ing.handle(topic, data).status == expected, expected
    assert state(api, cmd_a["id"])["state"] == "queued"
    assert state(api, cmd_b["id"])["state"] == "queued"
    assert [s for s, _ in events(api, a.id)] == [
        chain.BAD_SIGNATURE, acceptance.TOPIC_MISMATCH, chain.UNKNOWN_KEY,
        acceptance.UNKNOWN_COMMAND, acceptance.RESULT_MISMATCH, chain.MALFORMED,
        chain.MALFORMED]
    assert [s for s, _ in events(api, b.id)] == [chain.BAD_SIGNATURE]
    with Session(api.engine) as s:
        dev_a, dev_b = s.get(Device, a.id), s.get(Device, b.id)
        assert dev_a is not None and dev_b is not None
        assert (dev_a.forgeries, dev_a.malformed) == (1, 2)
        assert dev_b.forgeries == 1
        assert s.exec(select(AuditRecord).where(
            AuditRecord.action == "command.result")).first() is None


def test_repeated_forged_results_quarantine_the_publisher(api: Api) -> None:
    a = enroll_device(api, 4)
    cmd = queue(api, a.id)
    ing = Ingestor(api.engine, api.settings)
    rogue = EcSigner.generate()
    for _ in range(api.settings.limits.quarantine_after_forgeries):
        assert ing.handle(result_topic(a.id), answer(a, cmd["seq"], signer=rogue)).status == (
            chain.BAD_SIGNATURE)
    got = api.client.get("/devices/%s" % a.id, headers=api.headers(Role.viewer)).json()
    assert got["state"] == "quarantined"
    assert ing.handle(result_topic(a.id), answer(a, cmd["seq"])).status == (
        acceptance.NOT_ACCEPTING)
    assert state(api, cmd["id"])["state"] == "queued"


def test_a_late_result_is_still_what_the_device_did(api: Api) -> None:
    a = enroll_device(api, 5)
    cmd = queue(api, a.id)
    sec = api.headers(Role.security)
    assert api.client.post("/commands/%d/cancel" % cmd["id"], headers=sec).status_code == 200
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(result_topic(a.id), answer(a, cmd["seq"], "refused",
                                                 detail="no such command")).status == (
        acceptance.RESULT)
    got = state(api, cmd["id"])
    assert (got["state"], got["result_detail"]) == ("refused", "no such command")
    with Session(api.engine) as s:
        row = s.exec(select(AuditRecord).where(AuditRecord.action == "command.result")).one()
    assert '"was":"cancelled"' in row.detail


@pytest.mark.parametrize("silent", [True, False])
def test_a_device_back_after_a_silence_gets_its_commands_at_once(api: Api,
                                                                 silent: bool) -> None:
    a = enroll_device(api, 6 + int(silent))
    cmd = queue(api, a.id)
    ing_returned: list[list[str]] = []
    ing = Ingestor(api.engine, api.settings, on_return=ing_returned.append)
    assert ing.handle(a.topic, a.sign()).status == chain.OK  # its first batch: it is here
    assert ing_returned == [[a.id]]
    ing_returned.clear()
    later = utcnow() + dt.timedelta(hours=1)
    with Session(api.engine) as s:  # delivered once, the next try an hour away
        command_queue.record_try(s, cmd["id"], delivered=True, now=utcnow(),
                                 next_try_at=later)
        if silent:
            dev = s.get(Device, a.id)
            assert dev is not None and dev.last_seen is not None
            dev.last_seen -= dt.timedelta(seconds=api.settings.limits.command_silence_s + 1)
            s.add(dev)
        s.commit()
    assert ing.handle(a.topic, a.sign()).status == chain.OK
    with Session(api.engine) as s:
        row = s.get(FleetCommand, cmd["id"])
        assert row is not None and row.state == "sent"
        due_now = row.next_try_at <= utcnow()
    assert due_now == silent
    assert ing_returned == ([[a.id]] if silent else [])
