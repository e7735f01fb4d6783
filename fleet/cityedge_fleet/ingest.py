"""The ingest: verify every signed batch that arrives on MQTT, classify it on its device's
chain, store its readings with their provenance, and record everything else.

``Ingestor.handle_many(messages)`` is the whole decision for a group of MQTT messages and
does no network I/O (tests feed it bytes; ``handle`` is a group of one). The group is one
database transaction: chain states are read once per device and written once
(``ingest_store.ChainStates``), readings stream into a ``COPY`` while the group is decided
(PostgreSQL; one ``executemany`` on SQLite: ``ingest_store.ReadingRows``).
``ingest_mqtt.MqttIngestWorker`` acknowledges a message only after its group committed, so
nothing acknowledged is lost.

Two topics (``ce/v1/<publisher>/up/<kind>``; the broker ACL lets a client write only under
its own certificate CN, so the publisher is authenticated):

- ``up/readings``: the publisher's own batches. It must be a registered device that is
  provisioned or active, and the batch must be signed by one of *its* keys
  (``TopicKeyring``): another device's key is ``topic_mismatch``.
- ``up/relay``: a gateway forwarding its downstream nodes' batches unchanged. The gateway
  must be provisioned or active; each batch is verified with the *node's* registered key
  (found by kid) and classified on the node's chain; the node must name the publisher as
  its gateway (``Device.gateway_id``; ``not_relay_gateway`` otherwise: no device relays
  another's captured batches) and be provisioned or active (``not_accepting``); a batch
  signed with the gateway's own key is ``topic_mismatch`` (its own batches go on
  ``up/readings``). Stored readings name the gateway in ``via``. A bad signature counts
  as a forgery of the *gateway*, a malformed batch or a refused relay as its malformed
  message: it published the bytes, and a relay checks node batches before forwarding.

The topic's publisher level must be a device URN (``batch.check_device_id``), else the
message is ``bad_topic`` (ignored, no event).

Per message:

1. accepted batches (ok / gap / reordered / fork) store their readings; drop records
   close their range of the chain; anything not ``ok`` becomes an ``IngestEvent``
   (details bounded, control characters replaced);
2. a batch whose SenML breaks the core's rules (which bound every field to what the
   ``reading`` columns store) is ``malformed``: no reading stored, so no content can make
   the group's transaction fail;
3. a publisher is quarantined after ``quarantine_after_forgeries`` bad signatures, or
   after ``quarantine_after_malformed`` malformed messages and refused relays.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from cityedge_core import batch as batchmod
from cityedge_core import chain, limits, topics
from cityedge_core.chain import KeyEntry
from cityedge_core.errors import PeerError
from cityedge_fleet import audit, reading_rows, registry
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest_store import ChainStates, ReadingRow, ReadingRows
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

TOPIC_MISMATCH = "topic_mismatch"  # signed by a key of another device than the topic's
UNKNOWN_DEVICE = "unknown_device"  # the topic names no registered device
NOT_ACCEPTING = "not_accepting"  # the device is registered, quarantined or retired
NOT_RELAY_GATEWAY = "not_relay_gateway"  # a relayed node does not name the publisher
BAD_TOPIC = "bad_topic"
DEAD_LETTER = "dead_letter"  # kept aside: the database refused it alone (ingest_dead_letter)
READINGS = topics.READINGS  # topic kinds the ingest takes
RELAY = topics.RELAY
ACCEPTING = (DeviceState.provisioned, DeviceState.active)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_topic(topic: str) -> tuple[str, str] | None:
    """``(publisher, kind)`` of ``ce/v1/<publisher>/up/<readings|relay>`` where the
    publisher is a device URN, else None (``cityedge_core.topics`` is the scheme)."""
    parsed = topics.parse(topic)
    if parsed is None or parsed[1] != topics.UP or parsed[2] not in (READINGS, RELAY):
        return None
    try:
        batchmod.check_device_id(parsed[0])
    except PeerError:
        return None
    return parsed[0], parsed[2]


def bounded_text(text: str, most: int = EVENT_DETAIL_MAX) -> str:
    """``text`` as any column stores it: at most ``most`` characters, control characters
    (PostgreSQL cannot store NUL) and lone surrogates replaced by ``?``."""
    text = _CONTROL.sub("?", text[:most])
    return text.encode("utf-8", "replace").decode("utf-8")


def topic_device(topic: str) -> str | None:
    parsed = parse_topic(topic)
    return parsed[0] if parsed is not None and parsed[1] == READINGS else None


class Keyring:
    """kid -> KeyEntry for every active credential, loaded from the registry.

    Reloaded when older than ``max_age_s`` (so a revocation reaches every worker within
    that time). A kid it does not know (a device enrolled since the last load) is looked up
    on its own with one indexed query, at once: a device's first batch may arrive within
    milliseconds of its enrollment, and must not be refused for a stale cache. Loads use the
    caller's session: on SQLite a second connection would wait for the write lock that
    session holds.
    """

    def __init__(self, max_age_s: float = 5.0) -> None:
        self.max_age_s = max_age_s
        self.entries: dict[bytes, KeyEntry] = {}
        self.loaded_at = -float("inf")

    def reload(self, session: Session) -> None:
        entries: dict[bytes, KeyEntry] = {}
        for cred in session.exec(select(Credential).where(
                Credential.status == CredentialStatus.active)):
            entries[bytes.fromhex(cred.kid)] = _entry(cred)
        self.entries = entries
        self.loaded_at = time.monotonic()

    def get(self, kid: bytes, session: Session) -> KeyEntry | None:
        if time.monotonic() - self.loaded_at >= self.max_age_s:
            self.reload(session)
        entry = self.entries.get(kid)
        if entry is None and len(kid) <= limits.KID_MAX_BYTES:
            cred = session.exec(select(Credential).where(
                Credential.kid == kid.hex(),
                Credential.status == CredentialStatus.active)).first()
            if cred is not None:
                entry = self.entries[kid] = _entry(cred)
        return entry


def _entry(cred: Credential) -> KeyEntry:
    return KeyEntry(cred.device_id, EcVerifier.from_sec1(bytes.fromhex(cred.public_key)))


class TopicKeyring:
    """The keyring seen from a ``readings`` topic: only the topic device's keys count."""

    def __init__(self, keyring: Keyring, device: str, session: Session) -> None:
        self.keyring = keyring
        self.device = device
        self.session = session
        self.refusal: tuple[str, str] | None = None  # (status, detail) when a key is refused

    def get(self, kid: bytes) -> KeyEntry | None:
        entry = self.keyring.get(bytes(kid), self.session)
        if entry is not None and entry.device != self.device:
            self.refusal = (TOPIC_MISMATCH, "signed with a key of %s" % entry.device)
            return None
        return entry


class RelayKeyring:
    """The keyring seen from a gateway's ``relay`` topic: keys of accepting nodes only."""

    def __init__(self, keyring: Keyring, gateway: str, group: _Group) -> None:
        self.keyring = keyring
        self.gateway = gateway
        self.group = group
        self.session = group.session
        self.refusal: tuple[str, str] | None = None
        self.node: Device | None = None

    def get(self, kid: bytes) -> KeyEntry | None:
        entry = self.keyring.get(bytes(kid), self.session)
        if entry is None:
            return None
        if entry.device == self.gateway:
            self.refusal = (TOPIC_MISMATCH, "the gateway's own batch on its relay topic")
            return None
        node = self.group.device(entry.device)
        if node is None or node.gateway_id != self.gateway:
            self.refusal = (NOT_RELAY_GATEWAY, "node %s reports through %s" % (
                entry.device, (node.gateway_id if node is not None else None) or "no gateway"))
            return None
        if node.state not in ACCEPTING:
            self.refusal = (NOT_ACCEPTING, "relayed node %s is %s" % (entry.device, node.state))
            return None
        self.node = node
        return entry


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

    def __init__(self, session: Session) -> None:
        self.session = session
        self.chains = ChainStates(session)
        self.readings = ReadingRows(session)
        self.devices: dict[str, Device | None] = {}  # strong references: the session's
        # identity map is weak, and a device read once is used by every message of it

    def prefetch(self, messages: Sequence[tuple[str, bytes]]) -> None:
        publishers = {p[0] for p in (parse_topic(t) for t, _ in messages) if p is not None}
        if publishers:
            for d in self.session.exec(select(Device).where(col(Device.id).in_(publishers))):
                self.devices[d.id] = d
            for p in publishers:
                self.devices.setdefault(p, None)
            self.chains.prefetch(publishers)

    def device(self, device_id: str) -> Device | None:
        if device_id not in self.devices:
            self.devices[device_id] = self.session.get(Device, device_id)
        return self.devices[device_id]

    def flush(self) -> None:
        self.readings.flush()
        self.chains.flush()


class Ingestor:
    """Verifies, classifies and stores MQTT messages, a group per transaction."""

    def __init__(self, engine: Engine, settings: Settings,
                 on_quarantine: Callable[[list[str]], None] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.keyring = Keyring(settings.limits.keyring_max_age_s)
        self.counts: dict[str, int] = {}
        # called with the devices a committed group quarantined (``fleet serve``: the
        # broker reconciler cuts them and the CRL suspends their certificates at once)
        self.on_quarantine = on_quarantine
        self._quarantined: list[str] = []

    def handle(self, topic: str, payload: bytes) -> Outcome:
        return self.handle_many([(topic, payload)])[0]

    def handle_many(self, messages: Iterable[tuple[str, bytes]]) -> list[Outcome]:
        """Decide and store ``(topic, payload)`` messages in order, in one transaction.

        Raises only for a local fault (the database); then nothing of the group is stored.
        """
        messages = list(messages)
        self._quarantined = []
        with Session(self.engine) as session:
            group = _Group(session)
            try:
                group.prefetch(messages)
                outcomes = [self._handle(group, topic, payload) for topic, payload in messages]
                group.flush()
                session.commit()
            except BaseException as e:
                group.readings.abort(e)  # a COPY in progress ends with the error
                raise
        for outcome in outcomes:
            self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if self._quarantined and self.on_quarantine is not None:
            self.on_quarantine(self._quarantined)
        return outcomes

    def _handle(self, group: _Group, topic: str, payload: bytes) -> Outcome:
        session = group.session
        parsed = parse_topic(topic)
        if parsed is None:
            log.warning("ignoring message on %r: not a readings or relay topic", topic)
            return Outcome(BAD_TOPIC, None)
        publisher_id, kind = parsed
        publisher = group.device(publisher_id)
        if publisher is None:
            self._event(session, publisher_id, UNKNOWN_DEVICE, None, "not registered")
            return Outcome(UNKNOWN_DEVICE, publisher_id)
        if publisher.state not in ACCEPTING:
            self._event(session, publisher_id, NOT_ACCEPTING, None,
                        "device is %s" % publisher.state)
            return Outcome(NOT_ACCEPTING, publisher_id)
        if kind == RELAY:
            return self._relayed(group, publisher, payload)
        keys = TopicKeyring(self.keyring, publisher_id, session)
        verdict = make_batch_verifier(keys, group.chains).check(payload)
        status = verdict.status
        seq = verdict.batch.seq if verdict.batch is not None else None
        if status == chain.UNKNOWN_KEY and keys.refusal is not None:
            status, detail = keys.refusal
            self._event(session, publisher_id, status, None, detail)
        elif status == chain.BAD_SIGNATURE:
            self._forgery(session, publisher, verdict.reason)
        elif verdict.accepted:
            return self._accept(group, publisher, verdict, publisher)
        elif status == chain.MALFORMED:
            self._malformed(session, publisher, publisher_id, status, seq, verdict.reason)
        else:
            self._event(session, publisher_id, status, seq, verdict.reason)
        return Outcome(status, publisher_id)

    def _relayed(self, group: _Group, gateway: Device, payload: bytes) -> Outcome:
        session = group.session
        keys = RelayKeyring(self.keyring, gateway.id, group)
        verdict = make_batch_verifier(keys, group.chains).check(payload)
        status = verdict.status
        gateway.last_seen = utcnow()
        session.add(gateway)
        if status == chain.UNKNOWN_KEY and keys.refusal is not None:
            status, detail = keys.refusal
            if status == NOT_RELAY_GATEWAY:
                self._malformed(session, gateway, gateway.id, status, None, "relay: " + detail)
            else:
                self._event(session, gateway.id, status, None, "relay: " + detail)
            return Outcome(status, gateway.id)
        if status == chain.BAD_SIGNATURE:
            self._forgery(session, gateway, "relay: " + verdict.reason)
            return Outcome(status, gateway.id)
        if verdict.accepted and keys.node is not None:
            return self._accept(group, keys.node, verdict, gateway)
        if verdict.batch is not None:
            node = verdict.batch.device
        else:  # a node's signature held over a payload that is not a valid batch
            node = keys.node.id if keys.node is not None else gateway.id
        seq = verdict.batch.seq if verdict.batch is not None else None
        detail = "relayed by %s: %s" % (gateway.id, verdict.reason)
        if status == chain.MALFORMED:
            self._malformed(session, gateway, node, status, seq, detail)
        else:
            self._event(session, node, status, seq, detail)
        return Outcome(status, node, via=gateway.id)

    def _accept(self, group: _Group, device: Device, verdict: chain.Verdict,
                publisher: Device) -> Outcome:
        """Store an accepted batch of ``device`` that ``publisher`` sent (itself, or the
        gateway relaying it)."""
        session = group.session
        b = verdict.batch
        count = 0
        via = None if publisher is device else publisher.id
        suffix = "" if via is None else "relayed by %s" % via
        if b.kind == batchmod.KIND_DROP:
            first, last, batches, readings = b.dropped
            detail = "device dropped seq %d..%d: %d batches, %d readings" % (
                first, last, batches, readings)
            self._event(session, device.id, "drop", b.seq,
                        detail + (" (%s)" % suffix if suffix else ""),
                        explained=verdict.explained)
        else:
            try:
                rows = _readings(device.id, verdict, time.time(), via)
            except PeerError as e:  # signed, chained, but its records do not resolve
                self._malformed(session, publisher, device.id, chain.MALFORMED, b.seq,
                                str(e) + (" (%s)" % suffix if suffix else ""))
                return Outcome(chain.MALFORMED, device.id, via=via)
            group.readings.extend(rows)
            count = len(rows)
        if verdict.status != chain.OK:
            self._event(session, device.id, verdict.status, b.seq, suffix,
                        missing=verdict.missing)
        if device.state == DeviceState.provisioned:
            registry.set_state(session, device=device, state=DeviceState.active)
        device.last_seen = utcnow()
        if device not in session:  # read by this session: its changes are tracked already
            session.add(device)  # (add walks the relationship cascades on every call)
        return Outcome(verdict.status, device.id, count, via)

    def _forgery(self, session: Session, device: Device, reason: str) -> None:
        device.forgeries += 1
        session.add(device)
        self._event(session, device.id, chain.BAD_SIGNATURE, None, reason)
        self._quarantine_after(session, device, "forgeries", device.forgeries,
                               self.settings.limits.quarantine_after_forgeries)

    def _malformed(self, session: Session, publisher: Device, device_id: str, status: str,
                   seq: int | None, detail: str) -> None:
        """A malformed message or a refused relay: an event about ``device_id`` (the
        batch's device when it names one), counted against the ``publisher``."""
        publisher.malformed += 1
        session.add(publisher)
        self._event(session, device_id, status, seq, detail)
        self._quarantine_after(session, publisher, "malformed", publisher.malformed,
                               self.settings.limits.quarantine_after_malformed)

    def _quarantine_after(self, session: Session, device: Device, what: str, count: int,
                          limit: int) -> None:
        if count >= limit and device.state != DeviceState.quarantined:
            registry.set_state(session, device=device, state=DeviceState.quarantined)
            audit.append(session, actor="ingest", action="device.quarantine",
                         outcome=audit.OK, target=device.id, detail={what: count})
            self._quarantined.append(device.id)

    @staticmethod
    def _event(session: Session, device_id: str, status: str, seq: int | None, detail: str,
               missing: int = 0, explained: int = 0) -> None:
        session.add(IngestEvent(device_id=device_id, status=status, seq=seq,
                                detail=bounded_text(detail), missing=missing,
                                explained=explained))
