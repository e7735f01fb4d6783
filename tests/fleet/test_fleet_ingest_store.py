"""The ingest's writes, on SQLite and PostgreSQL: readings streamed into a ``COPY`` while a
group is decided (ended and reopened around any other statement) store exactly the
accepted readings with their provenance; a group whose transaction the database refuses
stores nothing, and the worker acknowledges each of its messages only once it is stored
(one by one; nothing after a message the database still refuses); chain states encoded by
``cbor2`` are the core's bytes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from cityedge_core import batch as batchmod
from cityedge_core import chain
from cityedge_core.chain import ChainState
from cityedge_fleet import ingest as ingest_mod
from cityedge_fleet import ingest_store
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import ChainStateRow, IngestEvent, Reading
from cityedge_host.crypto import EcSigner

from support.fleet import (
    Api,
    FakeMessage,
    enroll_device,
    offline_worker,
    records,
    relay_topic,
    wait_for,
)

_ROW = ("device_id", "t", "name", "unit", "value", "batch_seq", "status", "timebase", "via")


def _stored(engine: Engine) -> list[tuple[object, ...]]:
    with Session(engine) as s:
        return sorted(tuple(getattr(r, c) for c in _ROW)
                      for r in s.exec(select(Reading)).all())


def _rows_of(device: str, n: int, seq: int, status: str, via: str | None = None,
             t0: float = 1_790_000_000.0) -> list[tuple[object, ...]]:
    """``ingest_support.records(n, t0)`` as stored rows."""
    return [(device, t0 + i, "pm25-%d" % i, "ug/m3", 1.5 + i, seq, status, 0, via)
            for i in range(n)]


def _refuse_events(engine: Engine, refuse: bool) -> None:
    """A trigger that makes the database refuse any new ingest event (a real refusal, not
    a mock): the transaction of a group that records one fails at its commit."""
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            if refuse:
                c.exec_driver_sql(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
                c.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON ingest_event "
                                  "FOR EACH ROW EXECUTE FUNCTION refuse()")
            else:
                c.exec_driver_sql("DROP TRIGGER refuse ON ingest_event")
                c.exec_driver_sql("DROP FUNCTION refuse()")
        elif refuse:
            c.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON ingest_event "
                              "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        else:
            c.exec_driver_sql("DROP TRIGGER refuse")


def test_streamed_copy_stores_exactly_the_accepted_readings(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows go to the database after every batch (``STREAM_ROWS`` = 1), and statements in
    the middle of the group (a kid not cached is looked up; a relayed node is read; the
    ORM flushes before those queries) end the COPY in progress and later rows open another."""
    monkeypatch.setattr(ingest_store, "STREAM_ROWS", 1)
    gw = enroll_device(api, 3)
    a = enroll_device(api, 1)
    b = enroll_device(api, 2, gateway=gw.id)
    ing = Ingestor(api.engine, api.settings)
    assert ing.handle(gw.topic, gw.sign(1)).status == chain.OK  # keyring loaded, a cached
    late = enroll_device(api, 4)  # enrolled after the keyring was loaded: looked up
    a1, a2, a3 = (a.sign(3) for _ in range(3))
    b1, b2 = (b.sign(2) for _ in range(2))
    stranger = EcSigner.generate()
    unknown = batchmod.BatchWriter(a.id, stranger, stranger.kid).sign(records(1), boot=1)
    msgs = [(a.topic, a1), (b.topic, b1), (a.topic, unknown), (a.topic, a3),
            (late.topic, late.sign(4)), (relay_topic(gw.id), b2), (a.topic, a1),
            (a.topic, a2)]
    outcomes = ing.handle_many(msgs)
    assert [o.status for o in outcomes] == [
        chain.OK, chain.OK, chain.UNKNOWN_KEY, chain.GAP, chain.OK, chain.OK,
        chain.DUPLICATE, chain.REORDERED]
    want = sorted(_rows_of(a.id, 3, 1, chain.OK) + _rows_of(b.id, 2, 1, chain.OK)
                  + _rows_of(a.id, 3, 3, chain.GAP) + _rows_of(late.id, 4, 1, chain.OK)
                  + _rows_of(b.id, 2, 2, chain.OK, via=gw.id)
                  + _rows_of(a.id, 3, 2, chain.REORDERED) + _rows_of(gw.id, 1, 1, chain.OK))
    assert _stored(api.engine) == want
    assert sum(o.readings for o in outcomes) == len(want) - 1  # the gateway's was before
    with Session(api.engine) as s:
        states = {r.device_id: r.last_seq for r in s.exec(select(ChainStateRow))}
        assert states == {a.id: 3, b.id: 2, gw.id: 1, late.id: 1}
        events = s.exec(select(IngestEvent.status).order_by(col(IngestEvent.id))).all()
        assert events == [chain.UNKNOWN_KEY, chain.GAP, chain.DUPLICATE, chain.REORDERED]


@pytest.mark.parametrize("stream_rows", [1, 1000])
def test_a_group_the_database_refuses_stores_nothing_and_comes_again(
        api: Api, monkeypatch: pytest.MonkeyPatch, stream_rows: int) -> None:
    """The refusal comes at the commit, after readings were streamed (or not): nothing of
    the group is stored, the chain state is not advanced, and the same messages stored
    again later give the verdicts they would have had."""
    monkeypatch.setattr(ingest_store, "STREAM_ROWS", stream_rows)
    a = enroll_device(api, 5)
    ing = Ingestor(api.engine, api.settings)
    a1, a2, a3 = (a.sign(5) for _ in range(3))
    assert ing.handle(a.topic, a1).status == chain.OK
    _refuse_events(api.engine, True)
    with pytest.raises(Exception, match="refused by the test"):
        ing.handle_many([(a.topic, a3), (a.topic, a2)])  # a3 is a gap: an event
    assert _stored(api.engine) == _rows_of(a.id, 5, 1, chain.OK)
    _refuse_events(api.engine, False)
    outcomes = ing.handle_many([(a.topic, a3), (a.topic, a2)])
    assert [o.status for o in outcomes] == [chain.GAP, chain.REORDERED]
    assert _stored(api.engine) == sorted(_rows_of(a.id, 5, 1, chain.OK)
                                         + _rows_of(a.id, 5, 3, chain.GAP)
                                         + _rows_of(a.id, 5, 2, chain.REORDERED))


def test_a_fault_in_the_middle_of_a_group_ends_the_copy_and_stores_nothing(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local fault while the group is decided (a COPY in progress on PostgreSQL): the
    COPY ends with the error, nothing of the group is stored, and the engine's connections
    serve the next group."""
    monkeypatch.setattr(ingest_store, "STREAM_ROWS", 1)
    a = enroll_device(api, 7)
    ing = Ingestor(api.engine, api.settings)
    a1, a2, a3 = (a.sign(2) for _ in range(3))
    real = ingest_mod._readings
    calls = []

    def failing(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("a local fault")
        return real(*args)

    monkeypatch.setattr(ingest_mod, "_readings", failing)
    with pytest.raises(MemoryError):
        ing.handle_many([(a.topic, a1), (a.topic, a2), (a.topic, a3)])
    assert len(calls) == 3 and _stored(api.engine) == []
    monkeypatch.setattr(ingest_mod, "_readings", real)
    for _ in range(6):  # more than the pool holds: every pooled connection is usable
        assert _stored(api.engine) == []
    outcomes = ing.handle_many([(a.topic, a1), (a.topic, a2), (a.topic, a3)])
    assert [o.status for o in outcomes] == [chain.OK] * 3
    assert _stored(api.engine) == sorted(_rows_of(a.id, 2, 1, chain.OK)
                                         + _rows_of(a.id, 2, 2, chain.OK)
                                         + _rows_of(a.id, 2, 3, chain.OK))


class _ComesBackWhileWaiting(threading.Event):
    """The worker's stop event; its first wait (the worker's pause after a round the
    database refused) runs ``comeback`` first."""

    def __init__(self, comeback: Callable[[], object]) -> None:
        super().__init__()
        self._comeback: Callable[[], object] | None = comeback

    def wait(self, timeout: float | None = None) -> bool:
        if self._comeback is not None:
            comeback, self._comeback = self._comeback, None
            comeback()
        return super().wait(timeout)


def test_the_worker_acknowledges_a_refused_group_only_once_it_is_stored(
        api: Api, tmp_path: Path) -> None:
    """The MQTT worker with the real ingest and database, which refuses every event row
    (a trigger): the group fails, so its messages are tried one by one; the first needs no
    event and is stored and acknowledged; the second fails alone and so does its dead
    letter (it carries an event too): the database is down for it, and neither it nor the
    one after it is acknowledged until the database takes them, in order."""
    a = enroll_device(api, 6)
    worker, acks = offline_worker(api.settings, tmp_path, engine=api.engine, limits=FleetLimits(
        ingest_group_max_messages=10, ingest_attempts=2, ingest_retry_s=0.01,
        ingest_down_retry_max_s=0.2))
    b1, b2, b3 = (a.sign(2) for _ in range(3))
    _refuse_events(api.engine, True)
    for mid, data in ((1, b1), (2, b3), (3, b2)):
        worker._on_message(None, None, FakeMessage(mid, a.topic, data))
    # the database comes back while the worker waits between two rounds (as a restarted
    # database does), never in the middle of a round: there a message that failed its
    # tries would meet a dead-letter table that works again, and rightly be kept aside
    back = threading.Event()
    worker._stopping = _ComesBackWhileWaiting(lambda: (
        back.wait(60), _refuse_events(api.engine, False)))
    worker._start_thread()
    try:
        assert wait_for(lambda: worker.database_down >= 1, timeout=60)
        assert acks == [1] and _stored(api.engine) == _rows_of(a.id, 2, 1, chain.OK)
        back.set()
        assert wait_for(lambda: len(acks) == 3, timeout=60), acks
    finally:
        worker._stopping.set()
        assert worker._thread is not None
        worker._thread.join(5)
    assert acks == [1, 2, 3] and worker.dead_letters == 0
    assert _stored(api.engine) == sorted(_rows_of(a.id, 2, 1, chain.OK)
                                         + _rows_of(a.id, 2, 3, chain.GAP)
                                         + _rows_of(a.id, 2, 2, chain.REORDERED))


_hash = st.binary(min_size=32, max_size=32)
_seq = st.integers(min_value=0, max_value=2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(last_seq=_seq, last_hash=_hash,
       recent=st.lists(st.tuples(_seq, _hash).map(list), max_size=70),
       missing=st.lists(st.tuples(_seq, _seq).map(sorted), max_size=20),
       forgotten=_seq)
def test_chain_state_bytes_are_the_cores(last_seq: int, last_hash: bytes,
                                         recent: list[list[object]],
                                         missing: list[list[int]], forgotten: int) -> None:
    state = ChainState(last_seq, last_hash, recent, missing, forgotten)
    data = ingest_store.state_to_bytes(state)
    assert data == state.to_bytes()
    assert ingest_store.state_from_bytes(data).to_list() == \
        ChainState.from_bytes(data).to_list() == state.to_list()
