"""Property tests of the ingest against hostile devices, on SQLite and PostgreSQL.

1. Any validly signed batch, whatever SenML content the CBOR decoder can produce (huge
   and small integers, bignums, NaN, infinities, subnormals, long text with control
   characters and non-ASCII, bytes, nested junk under unknown labels, tags, simple values)
   is either stored or recorded as an event: ``handle_many`` returns an outcome, never
   raises, and another device's batch in the same group is stored.
2. A fuzz harness: several hostile devices (arbitrary signed content, garbage, forgeries,
   relays of captured batches of other devices) interleaved with good devices in groups
   through the real worker: every good batch is stored with status ``ok`` in the
   transaction of its own group, one commit per group (counted at the database), every
   message acknowledged in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import event as sa_event
from sqlalchemy import func
from sqlmodel import Session, select

from cityedge_core import chain, senml
from cityedge_core.cbor_types import UNDEFINED, Simple, Tag
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import IngestEvent, Reading

from support.fleet import (
    Api,
    EnrolledDevice,
    FakeMessage,
    enroll_device,
    forgery,
    offline_worker,
    refuse_rows,
)

HUGE = 1.7976931348623157e308
KNOWN = [senml.BN, senml.BT, senml.BU, senml.BV, senml.BS, senml.BVER, senml.N, senml.U,
         senml.V, senml.VS, senml.VB, senml.VD, senml.S, senml.T, senml.UT]
TEXT = st.one_of(
    st.sampled_from(["temp", "pm25", "a:b/c_d.e-f", "Cel", "%RH", "", "\u00b5g/m\u00b3"]),
    st.text(max_size=40),  # any code point but surrogates (CBOR text is UTF-8)
    st.text(alphabet="\x00\x01\x1b\x7f\x85\xa0a\u00e9\U0001f600", max_size=12),
    st.sampled_from(["a" * n for n in (64, 65, 128, 129, 192, 193, 256, 257)]),
)
NUMBER = st.one_of(
    st.floats(),  # NaN, infinities, subnormals, -0.0
    st.sampled_from([HUGE, -HUGE, 5e-324, 2.0**63, 1_790_000_000.0, 2**28 - 1]),
    st.integers(-(2**64), 2**64),
    st.integers(-(2**512) + 1, 2**512 - 1),  # bignums up to CBOR_MAX_BIGNUM_BYTES
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
)
SCALAR = st.one_of(NUMBER, TEXT, st.binary(max_size=24), st.booleans(), st.none(),
                   st.just(UNDEFINED), st.builds(Simple, st.sampled_from([0, 19, 32, 255])))
JUNK = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.integers(-3, 99), st.text(max_size=3)), inner, max_size=3),
    st.builds(Tag, st.sampled_from([1, 2, 3, 24, 99999]), inner)), max_leaves=6)
LABEL = st.one_of(st.sampled_from(KNOWN), st.integers(-(2**70), 2**70), st.text(max_size=6))
FIELD = {senml.BN: TEXT, senml.N: TEXT, senml.U: TEXT, senml.BU: TEXT, senml.VS: TEXT,
         senml.BT: NUMBER, senml.T: NUMBER, senml.BV: NUMBER, senml.V: NUMBER,
         senml.BS: NUMBER, senml.S: NUMBER, senml.UT: NUMBER, senml.VB: st.booleans(),
         senml.VD: st.binary(max_size=24), senml.BVER: NUMBER}


@st.composite
def plausible_record(draw: Any) -> dict[Any, Any]:
    """Known labels with values of roughly their type: many get as far as the database."""
    keys = draw(st.lists(st.sampled_from(KNOWN), min_size=1, max_size=5, unique=True))
    rec = {k: draw(FIELD[k]) for k in keys}
    if draw(st.booleans()):
        rec[senml.N] = draw(st.sampled_from(["temp", "rh", "x:y"]))
    return rec


@st.composite
def storable_record(draw: Any) -> dict[Any, Any]:
    """A name and one value at the edges of what the columns hold (most are stored)."""
    rec: dict[Any, Any] = {senml.N: draw(st.sampled_from(["t", "rh", "pm/2.5", "a" * 128]))}
    kind = draw(st.sampled_from([senml.V, senml.VS, senml.VB, senml.VD, senml.S]))
    rec[kind] = draw(FIELD[kind] if kind in (senml.VS, senml.VB, senml.VD) else st.one_of(
        st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False), NUMBER))
    for label in draw(st.lists(st.sampled_from([senml.U, senml.T, senml.BN, senml.BU,
                                                senml.BT, senml.UT, 99, "ext"]),
                               max_size=3, unique=True)):
        rec[label] = draw(st.one_of(NUMBER, st.sampled_from([0, 1.5, 2**28]))
                          if label in (senml.T, senml.BT, senml.UT)
                          else st.one_of(st.sampled_from(["Cel", "\u00b0C"]), TEXT)
                          if label in (senml.U, senml.BU, "ext")
                          else st.sampled_from(["dev:", "b" * 64]) if label == senml.BN
                          else SCALAR)
    return rec


RECORD = st.one_of(storable_record(), storable_record(), plausible_record(),
                   st.dictionaries(LABEL, st.one_of(SCALAR, JUNK), max_size=5), JUNK)
STORABLE = st.lists(storable_record(), min_size=1, max_size=4)
PACK = st.one_of(STORABLE, STORABLE, st.lists(RECORD, max_size=5), JUNK)
LOOSE = FleetLimits(quarantine_after_forgeries=10**9, quarantine_after_malformed=10**9,
                    ingest_group_max_messages=8, ingest_attempts=2, ingest_retry_s=0.01)
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
            HealthCheck.data_too_large]


def _count(api: Api, model: Any, device: str) -> int:
    with Session(api.engine) as s:
        return s.exec(select(func.count()).select_from(model).where(
            model.device_id == device)).one()


class _Devices:
    """Devices enrolled once per test (hypothesis reuses the function's fixtures)."""

    def __init__(self) -> None:
        self.devs: list[EnrolledDevice] = []

    def get(self, api: Api, n: int) -> list[EnrolledDevice]:
        while len(self.devs) < n:
            self.devs.append(enroll_device(api, 100 + len(self.devs)))
        return self.devs[:n]


@settings(max_examples=150, deadline=None, suppress_health_check=SUPPRESS)
@given(pack=PACK)
def test_any_signed_content_is_stored_or_recorded_and_others_go_on(
        api: Api, pack: Any) -> None:
    cache = getattr(api, "_devices", None) or _Devices()
    api._devices = cache  # type: ignore[attr-defined]
    hostile, good = cache.get(api, 2)
    ing = Ingestor(api.engine, api.settings.model_copy(update={"limits": LOOSE}))
    events = _count(api, IngestEvent, hostile.id)
    stored = _count(api, Reading, hostile.id)
    good_stored = _count(api, Reading, good.id)
    try:
        signed = hostile.writer.sign(pack, boot=1)
    except ValueError:  # over the batch size: not something a device can send
        return
    out = ing.handle_many([(hostile.topic, signed), (good.topic, good.sign(2))])
    event("hostile batch: %s" % ("stored" if out[0].readings else out[0].status))
    assert out[1].status == chain.OK and _count(api, Reading, good.id) == good_stored + 2
    assert _count(api, Reading, hostile.id) == stored + out[0].readings
    if out[0].status != chain.OK:
        assert _count(api, IngestEvent, hostile.id) == events + 1, out[0]
    if out[0].status not in chain.ACCEPTED:
        assert out[0].readings == 0


@st.composite
def schedules(draw: Any) -> tuple[list[tuple[str, int, Any]], int]:
    """Messages ``(kind, device index, detail)``: each good device's batches in order,
    hostile messages anywhere between them; and a group size."""
    good = [("good", g, i) for g in range(3) for i in range(draw(st.integers(1, 3)))]
    hostile = draw(st.lists(st.tuples(
        st.sampled_from(["content", "garbage", "forged", "relay"]), st.integers(0, 2),
        st.one_of(PACK, st.binary(max_size=40), st.integers(0, 8))), max_size=10))
    order = draw(st.permutations(good + [(k, h, d) for k, h, d in hostile]))
    # each good device's own batches keep their order wherever they land
    slots = {g: iter(sorted(i for kind, dg, i in order if kind == "good" and dg == g))
             for g in range(3)}
    merged = [(kind, d, next(slots[d]) if kind == "good" else x) for kind, d, x in order]
    return merged, draw(st.integers(1, 8))


@settings(max_examples=25, deadline=None, suppress_health_check=SUPPRESS)
@given(plan=schedules())
def test_hostile_devices_delay_no_good_device(api: Api, tmp_path: Path,
                                              plan: tuple[list[Any], int]) -> None:
    schedule, size = plan
    state = getattr(api, "_harness", None)
    if state is None:
        devs = _Devices().get(api, 6)
        worker, acks = offline_worker(api.settings, tmp_path, limits=LOOSE, engine=api.engine)
        commits: list[int] = []
        sa_event.listen(api.engine, "commit", lambda _c: commits.append(1))
        state = api._harness = (devs, worker, acks, commits)  # type: ignore[attr-defined]
    devs, worker, acks, commits = state
    good, hostile = devs[:3], devs[3:]
    # every good batch of this schedule, signed in order before anything is sent
    batches = {(g, i): good[g].sign(2) for kind, g, i in schedule if kind == "good"}
    messages: list[tuple[str, int, bytes]] = []  # (topic, good device or -1, bytes)
    for kind, d, x in schedule:
        h = hostile[d]
        if kind == "good":
            messages.append((good[d].topic, d, batches[(d, x)]))
        elif kind == "content":
            try:
                messages.append((h.topic, -1, h.writer.sign(x, boot=1)))
            except (ValueError, TypeError):  # too large, or not a pack the encoder takes
                continue
        elif kind == "garbage":
            messages.append((h.topic, -1, x if isinstance(x, bytes) else b"\xd2\x84"))
        elif kind == "forged":
            victim = good[x % 3] if isinstance(x, int) else h
            messages.append((h.topic, -1, forgery(victim.signer.kid, victim.id, 1)))
        else:  # a captured batch of a good device, on the hostile device's relay topic
            captured = list(batches.values())  # never empty: each good device sends one
            data = captured[x % len(captured) if isinstance(x, int) else 0]
            messages.append(("ce/v1/%s/up/relay" % h.id, -1, data))
    before = {g.id: _count(api, Reading, g.id) for g in good}
    expected = dict(before)
    first_mid = len(acks) + 1
    mid = first_mid
    for start in range(0, len(messages), size):
        chunk = messages[start:start + size]
        group = []
        for topic, g, data in chunk:
            group.append(FakeMessage(mid, topic, data))
            mid += 1
            if g >= 0:
                expected[good[g].id] += 2
        done = len(commits)
        assert worker._store(group) is True
        assert len(commits) == done + 1  # one transaction for the group, nothing retried
        for g in good:  # stored in the commit of its own group: nobody waits
            assert _count(api, Reading, g.id) == expected[g.id]
    assert acks[first_mid - 1:] == list(range(first_mid, mid))
    assert worker.dead_letters == 0 and worker.database_down == 0
    with Session(api.engine) as s:
        for g in good:
            rows = s.exec(select(Reading).where(Reading.device_id == g.id)).all()
            assert {(r.status, r.via) for r in rows} <= {(chain.OK, None)}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_harness_sees_a_group_that_needs_the_fallback(api: Api, tmp_path: Path) -> None:
    """The harness's commit count is not vacuous: a group the database refuses (a real
    trigger on one row) needs more than one transaction."""
    a, b = enroll_device(api, 1), enroll_device(api, 2)
    worker, _acks = offline_worker(api.settings, tmp_path, limits=LOOSE, engine=api.engine)
    refuse_rows(api.engine, "reading", "NEW.name = 'boom'")
    commits: list[int] = []
    sa_event.listen(api.engine, "commit", lambda _c: commits.append(1))
    bad = b.writer.sign([{senml.BT: 1_790_000_000.0, senml.N: "boom", senml.V: 1}], boot=1)
    assert worker._store([FakeMessage(1, a.topic, a.sign(1)), FakeMessage(2, b.topic, bad)])
    # a's message, the check that the database takes transactions, the dead letter
    assert len(commits) == 3 and worker.dead_letters == 1
