"""``reading_stream``: the ingest keeps one row per (device, SenML name, chain verdict) of
which it stored a reading in the form open data publishes, in the readings' own
transaction; open data's catalogue reads those rows instead of grouping every reading.

On SQLite and PostgreSQL, through the real ingest: the rows are exactly the published
form's keys (boot-time and non-numeric readings add none), a rolled-back group adds none
and is not remembered as written, two ingest processes' workers adding the same streams at
once both commit, and migration 0016 fills the table from the readings already there. The
rule in Python (``stream_keys``) and open data's rule in SQL (``published``) are held
equal on random rows."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, select, text
from sqlmodel import Session

from cityedge_core import batch as batchmod
from cityedge_core import senml
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_store import READING_COLUMNS, stream_keys
from cityedge_fleet.models import STREAM_TIME_MAX, Reading, ReadingStream
from cityedge_fleet.opendata import catalogue

from support.fleet import Api, EnrolledDevice, enroll_device
from support.migrations import migrate_to

T0 = 1_790_000_000.0


def records(device: str, values: list[tuple[str, Any]]) -> list[dict[int, Any]]:
    out: list[dict[int, Any]] = []
    for i, (name, value) in enumerate(values):
        rec: dict[int, Any] = {senml.N: name, senml.T: float(i)}
        rec[senml.VS if isinstance(value, str) else senml.V] = value
        if i == 0:
            rec[senml.BT] = T0
            rec[senml.BN] = device + ":"
        out.append(rec)
    return out


def streams(engine: Any) -> set[tuple[str, str, str]]:
    with Session(engine) as s:
        return {tuple(r) for r in s.execute(  # type: ignore[misc]
            select(ReadingStream.device_id, ReadingStream.name, ReadingStream.status))}


def test_the_ingest_writes_each_stream_once_in_the_published_form(api: Api) -> None:
    a, b = enroll_device(api, 1), enroll_device(api, 2)
    ingest = Ingestor(api.engine, api.settings)
    send = lambda dev, payload: ingest.handle(dev.topic, payload).status  # noqa: E731
    assert send(a, a.writer.sign(records(a.id, [("pm25", 1.5), ("temp", 20.0),
                                                ("label", "text")]), boot=1)) == "ok"
    assert send(a, a.writer.sign(records(a.id, [("pm25", 2.5)]), boot=1)) == "ok"
    # seconds since boot: no time open data could publish, so no stream
    assert send(b, b.writer.sign(records(b.id, [("pm25", 3.0)]), boot=1,
                                 timebase=batchmod.TIME_SINCE_BOOT)) == "ok"
    a.writer.head = bytes(32)  # a fork: its own verdict, its own stream row
    assert send(a, a.writer.sign(records(a.id, [("pm25", 9.0)]), boot=1)) == "fork"
    assert streams(api.engine) == {(a.id, a.id + ":pm25", "ok"), (a.id, a.id + ":temp", "ok"),
                                   (a.id, a.id + ":pm25", "fork")}
    # a second ingest process that never wrote them meets them there: nothing fails
    other = Ingestor(api.engine, api.settings)
    assert other.handle(b.topic, b.writer.sign(records(b.id, [("pm25", 4.0)]),
                                               boot=1)).status == "ok"
    # the chain goes on from the fork: ok again, a stream already there
    assert send(a, a.writer.sign(records(a.id, [("temp", 21.0)]), boot=1)) == "ok"
    assert streams(api.engine) == {(a.id, a.id + ":pm25", "ok"), (a.id, a.id + ":temp", "ok"),
                                   (a.id, a.id + ":pm25", "fork"), (b.id, b.id + ":pm25", "ok")}


def test_a_group_that_rolls_back_leaves_no_stream_and_is_written_again(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = enroll_device(api, 3)
    ingest = Ingestor(api.engine, api.settings)
    payload = dev.writer.sign(records(dev.id, [("pm25", 1.0)]), boot=1)

    def fail(_self: object) -> None:
        raise RuntimeError("the database went away before the commit")

    from cityedge_fleet import ingest as ingest_mod
    monkeypatch.setattr(ingest_mod._Group, "write_audits", fail)
    with pytest.raises(RuntimeError):
        ingest.handle(dev.topic, payload)
    assert streams(api.engine) == set() and ingest.streams == set()
    monkeypatch.undo()
    assert ingest.handle(dev.topic, payload).status == "ok"  # delivered again
    assert streams(api.engine) == {(dev.id, dev.id + ":pm25", "ok")}
    assert ingest.streams == {(dev.id, dev.id + ":pm25", "ok")}


def test_two_workers_adding_the_same_new_streams_at_once_both_commit(api: Api) -> None:
    devices: list[EnrolledDevice] = [enroll_device(api, 10 + i) for i in range(6)]
    names = ["n%d" % k for k in range(8)]
    # each worker sends one batch of every device (its seq 1 or 2), names in opposite
    # orders: new stream keys of the same devices from two transactions at once
    batches = {w: [(d.topic, d.writer.sign(records(
        d.id, [(n, 1.0) for n in (names if w == 0 else names[::-1])]), boot=1))
        for d in devices] for w in (0, 1)}
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(w: int) -> None:
        try:
            ing = Ingestor(api.engine, api.settings)
            start.wait()
            results[w] = [o.status for o in ing.handle_many(batches[w])]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # each device's two batches: one ``ok`` or ``gap``, the other after it or before it
    for i in range(len(devices)):
        assert sorted([results[0][i], results[1][i]]) in (
            ["gap", "reordered"], ["ok", "ok"]), (results, i)
    assert streams(api.engine) == {(d.id, "%s:%s" % (d.id, n), results[w][i])
                                   for i, d in enumerate(devices) for n in names
                                   for w in (0, 1)}


def test_the_catalogue_reads_the_streams_not_the_readings(api: Api, tmp_path: Any) -> None:
    """A reading stored without its stream row (written around the ingest) is not listed:
    the catalogue's datastreams come from ``reading_stream`` alone."""
    from cityedge_fleet.models import Device

    from support.opendata import PUBLIC_SITE, opendata_settings

    od_settings = opendata_settings(api.settings, tmp_path)
    dev = enroll_device(api, 4)
    with Session(api.engine) as s:
        row = s.get(Device, dev.id)
        assert row is not None
        row.site = PUBLIC_SITE
        s.add(row)
        s.add(Reading(device_id=dev.id, t=T0, name="pm25", value=1.0, batch_seq=1,
                      status="ok", timebase=0))
        s.commit()
        ids = catalogue.PublicIds(b"k" * 32)
        assert catalogue.build(s, od_settings, ids).datastreams == {}
        s.add(ReadingStream(device_id=dev.id, name="pm25", status="ok"))
        s.commit()
        built = catalogue.build(s, od_settings, ids)
    assert set(built.by_stream) == {(dev.id, "pm25")}


def test_migration_0016_fills_the_streams_from_the_readings(db_url: str) -> None:
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0015")
        rows = [("d1", T0, "pm25", 1.0, "ok", 0), ("d1", T0 + 1, "pm25", 2.0, "ok", 0),
                ("d1", T0, "temp", None, "ok", 0),  # no number
                ("d1", 5.0, "boot", 1.0, "ok", 1),  # seconds since boot
                ("d2", T0, "pm25", 3.0, "fork", 0), ("d2", -1.0, "neg", 3.0, "ok", 0)]
        with engine.begin() as c:
            for dev, t, name, value, status, tb in rows:
                c.execute(text("INSERT INTO reading (device_id, t, name, value, batch_seq, "
                               "status, timebase) VALUES (:d, :t, :n, :v, 1, :s, :tb)"),
                          {"d": dev, "t": t, "n": name, "v": value, "s": status, "tb": tb})
        migrate_to(engine, "0016")
        with engine.connect() as c:
            got = {tuple(r) for r in c.execute(text(
                "SELECT device_id, name, status FROM reading_stream"))}
        assert got == {("d1", "pm25", "ok"), ("d2", "pm25", "fork")}
        migrate_to(engine, "0015", down=True)
        with engine.connect() as c:
            assert not engine.dialect.has_table(c, "reading_stream")
    finally:
        engine.dispose()


_value = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=True, width=64))
_t = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
               st.sampled_from([0.0, -0.0, STREAM_TIME_MAX, math.nextafter(STREAM_TIME_MAX, 0),
                                math.nextafter(STREAM_TIME_MAX, math.inf), -1e-300]))


_RULE_DB = create_engine("sqlite://")  # one in-memory table for every example below
Reading.metadata.create_all(_RULE_DB, tables=[Reading.__table__])  # type: ignore[attr-defined]
_RULE_SETTINGS = Settings(mode="development", database_url="sqlite://",
                          opendata_kinds={"pm25": {"name": "PM2.5", "unit_name": "ug/m3",
                                                   "unit_symbol": "ug/m3"}},
                          opendata_chain_statuses=["ok", "gap"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_t, _value, st.sampled_from([0, 1]),
                          st.sampled_from(["ok", "gap", "fork"])), min_size=1, max_size=12))
def test_the_python_rule_is_open_datas_sql_rule(rows: list[tuple[float, Any, int, str]]) -> None:
    """``stream_keys`` keeps exactly the rows ``catalogue.published`` selects (SQLite)."""
    od = _RULE_SETTINGS
    full = [("dev", t, "pm25", None, v, None, None, None, None, i + 1, status, tb, None)
            for i, (t, v, tb, status) in enumerate(rows)]
    with Session(_RULE_DB) as s:
        s.execute(text("DELETE FROM reading"))
        s.execute(insert(Reading), [dict(zip(READING_COLUMNS, r, strict=True)) for r in full])
        by_sql = {(r.device_id, r.name, r.status)
                  for r in s.execute(select(Reading).where(*catalogue.published(od))).scalars()}
        s.rollback()
    # the verdicts open data publishes are the catalogue's filter on the streams
    assert {k for k in stream_keys(full) if k[2] in od.opendata_chain_statuses} == by_sql

def test_a_device_sending_ever_new_names_cannot_grow_the_remembered_streams(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stolen device signs batches of names never seen: each adds its rows (as many as
    its readings, no more), and the set the ingest remembers starts over at its bound."""
    from cityedge_fleet import ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "STREAMS_KNOWN_MAX", 25)
    dev = enroll_device(api, 5)
    ingest = Ingestor(api.engine, api.settings)
    sizes = []
    for k in range(6):
        payload = dev.writer.sign(records(dev.id, [("x%d_%d" % (k, i), 1.0)
                                                   for i in range(10)]), boot=1)
        assert ingest.handle(dev.topic, payload).status == "ok"
        sizes.append(len(ingest.streams))
    assert max(sizes) <= 25 and sizes == [10, 20, 10, 20, 10, 20]
    assert len(streams(api.engine)) == 60  # one row per new name, all stored
