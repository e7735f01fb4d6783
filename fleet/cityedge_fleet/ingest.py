"""The ingest: verify every signed batch that arrives on MQTT, classify it on its device's
chain, store its readings with their provenance, and record everything else.

``Ingestor.handle_many(messages)`` is the whole decision for a group of MQTT messages and
does no network I/O (tests feed it bytes; ``handle`` is a group of one). The group is one
database transaction: chain states are read once per device and written once
(``ingest_store.ChainStates``), readings stream into a ``COPY`` while the group is decided
(PostgreSQL; one ``executemany`` on SQLite: ``ingest_store.ReadingRows``).
``ingest_mqtt.MqttIngestWorker`` acknowledges a message only after its group committed, so
nothing acknowledged is lost.

What is taken and who is at fault is decided by the acceptance rules
(``acceptance.Acceptance``: topic, publisher, signer, relay, chain, quarantine, each
with its number and its status), I/O-free and tested as tables; this module looks up what
they need (devices, keys, chain states: ``_Group``, ``Keyring``), runs the core's verifier
step by step between them (``BatchVerifier.envelope``, ``verify_with``, ``place``) and
stores their ``Decision``:

1. a taken batch (ok / gap / reordered / fork) stores its readings, or a drop record
   closes its range of the chain; anything not ``ok`` becomes an ``IngestEvent``
   (details bounded, control characters replaced);
2. a batch whose SenML breaks the core's rules (which bound every field to what the
   ``reading`` columns store) is ``malformed``: no reading stored, so no content can make
   the group's transaction fail;
3. a refusal's strike is counted against the publisher, which is quarantined (audited;
   ``on_quarantine`` told after the commit) when its count reaches the limit;
4. a device's signed result of a fleet command (``up/result``) is verified with the
   device's key and matched to its command by the acceptance rules 4x-12x, and recorded
   on the command (``command_queue.record_result``, audited ``command.result``);
5. a device's key rotation (``rotation_ingest``): its ``up/csr`` message is checked by
   the desk's own rules (every refusal audited) and answered with a certificate; the
   first batch stored with a rotation's new key proves it (the old certificate is revoked
   in the same transaction, and the CRL re-signed and the broker reloaded after the
   commit);
6. a device whose batch arrives after ``command_silence_s`` without one (or its first
   batch ever) is back: its unanswered commands are due again at once
   (``command_queue.resend_now``, in the same transaction; ``on_return`` is told after
   the commit, so ``fleet serve``'s publisher sends them now, not at its next look).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from cityedge_core import batch as batchmod
from cityedge_core import chain, command_decode, limits
from cityedge_core.chain import KeyEntry
from cityedge_core.errors import MalformedError, PeerError, SignatureError
from cityedge_fleet import (
    acceptance,
    audit,
    command_queue,
    reading_rows,
    registry,
    rotation,
    rotation_ingest,
)
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest_store import (
    STREAMS_KNOWN_MAX,
    ChainStates,
    ReadingRow,
    ReadingRows,
    StreamKey,
)
from cityedge_fleet.models import (
    EVENT_DETAIL_MAX,
    Credential,
    CredentialStatus,
    Device,
    DeviceState,
    IngestEvent,
    utcnow,
)
from cityedge_host.crypto import EcVerifier
from cityedge_host.verify import make_batch_verifier

log = logging.getLogger(__name__)

# the statuses the acceptance rules give (besides the chain's), named here for the tests
TOPIC_MISMATCH = acceptance.TOPIC_MISMATCH
UNKNOWN_DEVICE = acceptance.UNKNOWN_DEVICE
NOT_ACCEPTING = acceptance.NOT_ACCEPTING
NOT_RELAY_GATEWAY = acceptance.NOT_RELAY_GATEWAY
BAD_TOPIC = acceptance.BAD_TOPIC
DEAD_LETTER = "dead_letter"  # kept aside: the database refused it alone (ingest_dead_letter)
READINGS = acceptance.READINGS  # topic kinds the ingest takes
RELAY = acceptance.RELAY
RESULTS = acceptance.RESULTS
CSRS = acceptance.CSRS
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# kids (and devices) a worker's key cache keeps: a parsed key each, a few hundred bytes
KEYRING_MAX_ENTRIES = 200_000


parse_topic = acceptance.Acceptance.topic  # (publisher, kind) of a topic the ingest takes


def bounded_text(text: str, most: int = EVENT_DETAIL_MAX) -> str:
    """``text`` as any column stores it: at most ``most`` characters, control characters
    (PostgreSQL cannot store NUL) and lone surrogates replaced by ``?``."""
    text = _CONTROL.sub("?", text[:most])
    return text.encode("utf-8", "replace").decode("utf-8")


class Keyring:
    """kid -> KeyEntry for the active credentials this worker has used, each entry checked
    against the registry at most ``max_age_s`` ago (so a revocation reaches every worker
    within that time).

    The work is per group, never per fleet: at a group's start (``prefetch``) the active
    credentials of its publishers whose check is older than ``max_age_s`` are read in one
    indexed query; a kid still unknown or stale when a batch names it (a relayed node's, a
    device enrolled a moment ago) is looked up on its own with one indexed query, at once.
    (It used to read every active credential of the registry every ``max_age_s``, inside
    the storing transaction: with 10,000 devices that held each worker's transactions
    for seconds every few seconds, the C9 tail of docs/CAPACITY.md.) At most
    ``max_entries`` kids and devices are kept, the least recently checked dropped first.
    Loads use the caller's session: on SQLite a second connection would wait for the write
    lock that session holds.
    """

    def __init__(self, max_age_s: float = 5.0, max_entries: int = KEYRING_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self.clock = clock
        # kid -> (entry, its public key (hex), when it was checked), oldest check first
        self.entries: OrderedDict[bytes, tuple[KeyEntry, str, float]] = OrderedDict()
        self.devices: OrderedDict[str, float] = OrderedDict()  # device -> last prefetch

    def _fresh(self, checked: float, now: float) -> bool:
        return now - checked < self.max_age_s

    def _put(self, kid: bytes, device: str, public_key: str, now: float) -> KeyEntry:
        old = self.entries.pop(kid, None)
        if old is not None and old[0].device == device and old[1] == public_key:
            entry = old[0]  # the same key: its parsed point is kept
        else:
            entry = KeyEntry(device, EcVerifier.from_sec1(bytes.fromhex(public_key)))
        self.entries[kid] = (entry, public_key, now)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def prefetch(self, devices: Iterable[str], session: Session) -> None:
        """Check the active credentials of those of ``devices`` not checked within
        ``max_age_s`` (one query)."""
        now = self.clock()
        stale = sorted(d for d in devices if not self._fresh(self.devices.get(d, -math.inf),
                                                             now))
        if not stale:
            return
        for device, kid, public_key in session.exec(
                select(Credential.device_id, Credential.kid, Credential.public_key).where(
                    col(Credential.device_id).in_(stale),
                    Credential.status == CredentialStatus.active)):
            self._put(bytes.fromhex(kid), device, public_key, now)
        for d in stale:
            self.devices.pop(d, None)
            self.devices[d] = now
        while len(self.devices) > self.max_entries:
            self.devices.popitem(last=False)

    def get(self, kid: bytes, session: Session) -> KeyEntry | None:
        """The active credential ``kid`` names, checked within ``max_age_s``; None if the
        registry has no active one."""
        now = self.clock()
        hit = self.entries.get(kid)
        if hit is not None and self._fresh(hit[2], now):
            return hit[0]
        if len(kid) > limits.KID_MAX_BYTES:
            return None
        row = session.exec(select(Credential.device_id, Credential.public_key).where(
            Credential.kid == kid.hex(),
            Credential.status == CredentialStatus.active)).first()
        if row is None:
            self.entries.pop(kid, None)
            return None
        return self._put(kid, row[0], row[1], now)


@dataclass
class Outcome:
    status: str
    device: str | None
    readings: int = 0
    via: str | None = None  # the gateway that relayed the batch


def _readings(device: str, verdict: chain.Verdict, now: float,
              via: str | None) -> list[ReadingRow]:
    """Rows for the ``reading`` table, in ``ingest_store.READING_COLUMNS`` order."""
    b = verdict.batch
    base = now if b.timebase == batchmod.TIME_UNIX else 0.0
    return reading_rows.rows(device, b.records, base,
                             (b.seq, verdict.status, b.timebase, via))


class _Group:
    """What one transaction accumulates while its messages are decided."""

    def __init__(self, session: Session, streams: set[StreamKey] | None = None) -> None:
        self.session = session
        self.chains = ChainStates(session)
        self.readings = ReadingRows(session, streams if streams is not None else frozenset())
        self.devices: dict[str, Device | None] = {}  # strong references: the session's
        # identity map is weak, and a device read once is used by every message of it
        self.returned: set[str] = set()  # devices seen again after a silence
        # audit rows, appended last (``write_audits``): the audit log's lock is then taken
        # after every row lock of the group, in the order the API takes them (a device,
        # then the log), so the two cannot wait for each other
        self.audits: list[dict[str, object]] = []

    def prefetch(self, messages: Sequence[tuple[str, bytes]]) -> set[str]:
        """Read the publishers of ``messages`` and their chains; returns the publishers."""
        publishers = {p[0] for p in (parse_topic(t) for t, _ in messages) if p is not None}
        if publishers:
            for d in self.session.exec(select(Device).where(col(Device.id).in_(publishers))):
                self.devices[d.id] = d
            for p in publishers:
                self.devices.setdefault(p, None)
            self.chains.prefetch(publishers)
        return publishers

    def device(self, device_id: str) -> Device | None:
        if device_id not in self.devices:
            self.devices[device_id] = self.session.get(Device, device_id)
        return self.devices[device_id]

    def flush(self) -> None:
        self.readings.flush()
        self.chains.flush()

    def write_audits(self) -> None:
        if self.audits:
            self.session.flush()
            for row in self.audits:
                audit.append(self.session, **row)  # type: ignore[arg-type]


class Ingestor:
    """Verifies, classifies and stores MQTT messages, a group per transaction."""

    def __init__(self, engine: Engine, settings: Settings,
                 on_quarantine: Callable[[list[str]], None] | None = None,
                 on_return: Callable[[list[str]], None] | None = None,
                 rotations: rotation_ingest.RotationDesk | None = None) -> None:
        self.engine = engine
        self.rotations = rotations or rotation_ingest.RotationDesk(settings)
        self.settings = settings
        self.keyring = Keyring(settings.limits.keyring_max_age_s)
        lim = settings.limits
        self.rules = acceptance.Acceptance(lim.quarantine_after_forgeries,
                                           lim.quarantine_after_malformed)
        self.counts: dict[str, int] = {}
        # called with the devices a committed group quarantined (``fleet serve``: the
        # broker reconciler cuts them and the CRL suspends their certificates at once)
        self.on_quarantine = on_quarantine
        self._quarantined: list[str] = []
        # called with the devices a committed group saw again after a silence (``fleet
        # serve``: the command publisher sends their unanswered commands at once)
        self.on_return = on_return
        self._returned: list[str] = []
        # the reading streams this process wrote in a committed group (written again
        # only after ``STREAMS_KNOWN_MAX`` keys, when the set starts over)
        self.streams: set[StreamKey] = set()

    def devices_subscribed(self, devices: list[str]) -> int:
        """``devices`` are connected and subscribed again (the broker says so: on a
        RabbitMQ cluster, ``ingest_amqp``'s presence events): their unanswered commands are
        due now (one transaction), and ``on_return`` is told when any was. Returns how
        many commands were made due."""
        with Session(self.engine) as session:
            due = command_queue.resend_now(session, devices, utcnow())
            session.commit()
        if due and self.on_return is not None:
            self.on_return(sorted(set(devices)))
        return due

    def handle(self, topic: str, payload: bytes) -> Outcome:
        return self.handle_many([(topic, payload)])[0]

    def handle_many(self, messages: Iterable[tuple[str, bytes]]) -> list[Outcome]:
        """Decide and store ``(topic, payload)`` messages in order, in one transaction (in
        consecutive parts when key rotations' work fills one: at most
        ``ingest_group_max_rotation_steps`` CSRs taken or rotations proven each).

        Raises only for a local fault (the database); then nothing of the failing part or
        after it is stored (a part stored before it is stored again when the messages
        come again: its batches are duplicates, its CSRs find no rotation waiting).
        """
        messages = list(messages)
        outcomes: list[Outcome] = []
        while True:
            outcomes += self._handle_part(messages[len(outcomes):])
            if len(outcomes) >= len(messages):
                return outcomes

    def _handle_part(self, messages: list[tuple[str, bytes]]) -> list[Outcome]:
        """The outcomes of a prefix of ``messages``, stored in one transaction."""
        self._quarantined = []
        self._returned = []
        with Session(self.engine) as session:
            group = _Group(session, self.streams)
            try:
                self.keyring.prefetch(group.prefetch(messages), session)
                self.rotations.steps = 0
                outcomes = []
                for topic, payload in messages:
                    outcomes.append(self._handle(group, topic, payload))
                    if self.rotations.steps >= self.settings.limits.ingest_group_max_rotation_steps:
                        break  # the rest in a transaction of its own (``handle_many``)
                group.flush()
                if group.returned:
                    command_queue.resend_now(session, group.returned, utcnow())
                    self._returned = sorted(group.returned)
                group.write_audits()
                session.commit()
            except BaseException as e:
                group.readings.abort(e)  # a COPY in progress ends with the error
                self.rotations.crl_due = False  # nothing was revoked
                raise
            self.rotations.publish_crl(session)
        self._remember_streams(group.readings.new_streams)
        for outcome in outcomes:
            self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if self._quarantined and self.on_quarantine is not None:
            self.on_quarantine(self._quarantined)
        if self._returned and self.on_return is not None:
            self.on_return(self._returned)
        return outcomes

    def _remember_streams(self, committed: set[StreamKey]) -> None:
        if len(self.streams) + len(committed) > STREAMS_KNOWN_MAX:
            self.streams.clear()
        self.streams |= committed

    def _handle(self, group: _Group, topic: str, payload: bytes) -> Outcome:
        """One message through the acceptance rules (``acceptance``), then stored."""
        rules = self.rules
        parsed = rules.topic(topic)
        if parsed is None:
            log.warning("ignoring message on %r: not a readings or relay topic", topic)
            return self._keep(group, None, rules.bad_topic())
        publisher_id, kind = parsed
        if kind == CSRS:
            return self._csr(group, publisher_id, payload)
        publisher = group.device(publisher_id)
        refusal = rules.publisher(publisher_id, publisher)
        if refusal is not None or publisher is None:
            return self._keep(group, None, refusal or rules.bad_topic())
        if kind == RESULTS:
            return self._result(group, publisher, payload)
        if kind == RELAY:
            publisher.last_seen = utcnow()  # a gateway is seen when it relays
            group.session.add(publisher)
        verifier = make_batch_verifier(None, group.chains)
        try:
            msg = verifier.envelope(payload)
        except MalformedError as e:
            return self._keep(group, publisher, rules.malformed_envelope(publisher, str(e)))
        kid = msg.kid
        entry = self.keyring.get(bytes(kid), group.session) if kid is not None else None
        signer = entry.device if entry is not None else None
        node = (group.device(signer) if kind == RELAY and signer is not None
                and signer != publisher_id else None)
        refusal = rules.signer(kind, publisher, kid, signer, node)
        if refusal is not None or entry is None or signer is None:
            return self._keep(group, publisher, refusal or rules.bad_topic())
        try:
            batch, digest = verifier.verify_with(msg, entry, payload)
        except SignatureError as e:
            return self._keep(group, publisher, rules.forged(kind, publisher, str(e)))
        except MalformedError as e:  # the signature held over a payload that is no batch
            return self._keep(group, publisher, rules.malformed(kind, publisher, signer,
                                                                str(e)))
        verdict = verifier.place(batch, digest, kid)
        decision = rules.placed(kind, publisher, verdict)
        if not decision.taken:
            return self._keep(group, publisher, decision)
        device = publisher if node is None else node
        return self._take(group, kind, publisher, device, verdict, decision, bytes(kid))

    def _take(self, group: _Group, kind: str, publisher: Device, device: Device,
              verdict: chain.Verdict, decision: acceptance.Decision, kid: bytes) -> Outcome:
        """Store a batch the rules took: its readings (or a drop record's event)."""
        session = group.session
        b = verdict.batch
        count = 0
        suffix = " (%s)" % decision.detail if decision.detail else ""
        if b.kind == batchmod.KIND_DROP:
            first, last, batches, readings = b.dropped
            self._event(session, device.id, "drop", b.seq,
                        "device dropped seq %d..%d: %d batches, %d readings%s"
                        % (first, last, batches, readings, suffix),
                        explained=verdict.explained)
        else:
            try:
                rows = _readings(device.id, verdict, time.time(), decision.via)
            except PeerError as e:  # signed, chained, but its records do not resolve
                return self._keep(group, publisher, self.rules.malformed(
                    kind, publisher, device.id, str(e), b.seq))
            group.readings.extend(rows)
            count = len(rows)
        if decision.recorded:
            self._event(session, device.id, decision.status, b.seq, decision.detail,
                        missing=verdict.missing)
        if device.state == DeviceState.provisioned:
            registry.set_state(session, device=device, state=DeviceState.active)
        now = utcnow()
        if device.last_seen is None or (now - device.last_seen).total_seconds() >= \
                self.settings.limits.command_silence_s:
            group.returned.add(device.id)  # its first batch ever, or the first in a while
        device.last_seen = now
        self.rotations.batch_taken(session, device.id, kid, b.seq, group.audits)
        if device not in session:  # read by this session: its changes are tracked already
            session.add(device)  # (add walks the relationship cascades on every call)
        return Outcome(decision.status, device.id, count, decision.via)

    def _result(self, group: _Group, publisher: Device, payload: bytes) -> Outcome:
        """A device's result of a fleet command: acceptance rules 4x-12x, then recorded."""
        rules = self.rules
        session = group.session
        try:
            msg = command_decode.open_result(payload)
        except MalformedError as e:
            return self._keep(group, publisher,
                              rules.malformed_envelope(publisher, str(e), RESULTS))
        kid = bytes(msg.kid)
        entry = self.keyring.get(kid, session)
        signer = entry.device if entry is not None else None
        refusal = rules.signer(RESULTS, publisher, kid, signer, None)
        if refusal is not None or entry is None or signer is None:
            return self._keep(group, publisher, refusal or rules.bad_topic())
        try:
            msg.verify(entry.verifier)
        except SignatureError as e:
            return self._keep(group, publisher, rules.forged(RESULTS, publisher, str(e)))
        try:
            result = command_decode.result_from_payload(msg.payload)
        except MalformedError as e:
            return self._keep(group, publisher,
                              rules.malformed(RESULTS, publisher, signer, str(e)))
        refusal = rules.result_device(publisher, signer, result)
        if refusal is not None:
            return self._keep(group, publisher, refusal)
        cmd = command_queue.for_result(session, signer, result.seq)
        decision = rules.answered(publisher, cmd, result)
        if not decision.taken or cmd is None:
            return self._keep(group, publisher, decision)
        old = command_queue.record_result(session, cmd, result, payload)
        rotation.on_answer(session, cmd, result.outcome, result.detail,
                           actor="device:%s" % signer, audits=group.audits)
        group.audits.append({"actor": "device:%s" % signer, "action": "command.result",
                             "outcome": audit.OK, "target": signer,
                             "detail": {"command": cmd.id, "seq": cmd.seq, "name": cmd.name,
                                        "outcome": result.outcome, "was": old.value}})
        return Outcome(decision.status, signer)

    def _csr(self, group: _Group, publisher_id: str, payload: bytes) -> Outcome:
        """A key rotation's CSR (``rotation_ingest``: its own rules, each refusal audited)."""
        got = self.rotations.take_csr(group.session, publisher_id, payload, group.audits)
        if group.device(publisher_id) is not None:
            self._event(group.session, publisher_id, got.status, got.rotation, got.detail)
        return Outcome(got.status, publisher_id)

    def _keep(self, group: _Group, publisher: Device | None,
              decision: acceptance.Decision) -> Outcome:
        """Record a message the rules did not take: its event, and the publisher's strike
        (quarantine when it reaches its limit)."""
        session = group.session
        if decision.recorded and decision.device is not None:
            self._event(session, decision.device, decision.status, decision.seq,
                        decision.detail)
        if decision.strike is not None and publisher is not None:
            count = getattr(publisher, decision.strike) + 1
            setattr(publisher, decision.strike, count)
            session.add(publisher)
            if (self.rules.quarantines(decision.strike, count)
                    and publisher.state != DeviceState.quarantined):
                registry.set_state(session, device=publisher, state=DeviceState.quarantined)
                group.audits.append({"actor": "ingest", "action": "device.quarantine",
                                     "outcome": audit.OK, "target": publisher.id,
                                     "detail": {decision.strike: count}})
                self._quarantined.append(publisher.id)
        return Outcome(decision.status, decision.device, 0, decision.via)

    @staticmethod
    def _event(session: Session, device_id: str, status: str, seq: int | None, detail: str,
               missing: int = 0, explained: int = 0) -> None:
        session.add(IngestEvent(device_id=device_id, status=status, seq=seq,
                                detail=bounded_text(detail), missing=missing,
                                explained=explained))
