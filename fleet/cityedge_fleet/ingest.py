"""The ingest: verify every signed batch that arrives on MQTT, classify it on its device's
chain, store its readings with their provenance, and record everything else.

``Ingestor.handle(topic, payload)`` is the whole decision for one message and does no
network I/O (tests feed it bytes); ``MqttIngestWorker`` is the thin paho-mqtt (MQTT 5)
wrapper: a shared subscription ``$share/<group>/ce/v1/+/up/readings`` over TLS with a
client certificate, acknowledging each message only after its outcome is committed
(QoS 1, manual acks), so a crash redelivers rather than loses.

Per message, in one transaction:

1. the topic names a registered device that is provisioned, active (or quarantined:
   refused and recorded);
2. ``cityedge_core.chain.BatchVerifier`` checks it against that device's keys only
   (``TopicKeyring``): a batch signed with another device's key is ``topic_mismatch``;
3. accepted batches (ok / gap / reordered / fork) store their readings; drop records
   close their range of the chain; anything not ``ok`` becomes an ``IngestEvent``;
4. a device whose key signs ``quarantine_after_forgeries`` bad signatures is quarantined.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert
from sqlmodel import Session, select

from cityedge import fastcbor
from cityedge.crypto import EcVerifier
from cityedge_core import batch as batchmod
from cityedge_core import chain, senml
from cityedge_core.chain import BatchVerifier, ChainState, KeyEntry
from cityedge_fleet import audit, registry
from cityedge_fleet.config import Settings
from cityedge_fleet.models import (
    ChainStateRow,
    Credential,
    CredentialStatus,
    Device,
    DeviceState,
    IngestEvent,
    Reading,
    utcnow,
)

log = logging.getLogger(__name__)
READING_TABLE = Reading.__table__  # type: ignore[attr-defined]

TOPIC_MISMATCH = "topic_mismatch"  # signed by a key of another device than the topic's
UNKNOWN_DEVICE = "unknown_device"  # the topic names no registered device
NOT_ACCEPTING = "not_accepting"  # the device is registered, quarantined or retired
BAD_TOPIC = "bad_topic"
KEYRING_RELOAD_MIN_S = 1.0  # seconds between keyring reloads caused by unknown kids


def topic_device(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) != 5 or parts[:2] != ["ce", "v1"] or parts[3:] != ["up", "readings"]:
        return None
    return parts[2]


class Keyring:
    """kid -> KeyEntry for every active credential, loaded from the registry.

    Reloaded when older than ``max_age_s`` (so a revocation reaches every worker within
    that time) and, at most once a second, when a batch names a kid it does not know (a
    device enrolled since the last load). Loads use the caller's session: on SQLite a
    second connection would wait for the write lock that session holds.
    """

    def __init__(self, max_age_s: float = 5.0) -> None:
        self.max_age_s = max_age_s
        self.entries: dict[bytes, KeyEntry] = {}
        self.loaded_at = -float("inf")

    def reload(self, session: Session) -> None:
        entries: dict[bytes, KeyEntry] = {}
        for cred in session.exec(select(Credential).where(
                Credential.status == CredentialStatus.active)):
            entries[bytes.fromhex(cred.kid)] = KeyEntry(
                cred.device_id, EcVerifier.from_sec1(bytes.fromhex(cred.public_key)))
        self.entries = entries
        self.loaded_at = time.monotonic()

    def get(self, kid: bytes, session: Session) -> KeyEntry | None:
        age = time.monotonic() - self.loaded_at
        if age >= self.max_age_s:
            self.reload(session)
            age = 0.0
        entry = self.entries.get(kid)
        if entry is None and age >= KEYRING_RELOAD_MIN_S:
            self.reload(session)  # a device enrolled since the last load
            entry = self.entries.get(kid)
        return entry


class TopicKeyring:
    """The keyring seen from one topic: only the topic device's own keys are trusted."""

    def __init__(self, keyring: Keyring, device: str, session: Session) -> None:
        self.keyring = keyring
        self.device = device
        self.session = session
        self.other_device: str | None = None

    def get(self, kid: bytes) -> KeyEntry | None:
        entry = self.keyring.get(bytes(kid), self.session)
        if entry is not None and entry.device != self.device:
            self.other_device = entry.device
            return None
        return entry


class DbChainStates:
    """The verifier's per-device ``ChainState`` mapping, stored in ``chain_state``."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, device: str) -> ChainState | None:
        row = self.session.exec(select(ChainStateRow).where(
            ChainStateRow.device_id == device).with_for_update()).first()
        return ChainState.from_bytes(row.state) if row is not None else None

    def __setitem__(self, device: str, state: ChainState) -> None:
        row = self.session.get(ChainStateRow, device)
        if row is None:
            row = ChainStateRow(device_id=device, state=b"", last_seq=0)
        row.state = state.to_bytes()
        row.last_seq = state.last_seq
        row.missing = state.missing_count()
        row.forgotten = state.forgotten
        self.session.add(row)


@dataclass
class Outcome:
    status: str
    device: str | None
    readings: int = 0


def _readings(device: str, verdict: chain.Verdict, now: float) -> list[dict[str, Any]]:
    """Rows for the ``reading`` table (plain dicts: one multi-row INSERT per batch)."""
    b = verdict.batch
    base = now if b.timebase == batchmod.TIME_UNIX else 0.0
    rows = []
    for rec in senml.resolve(b.records, base):
        vd = rec.get(senml.VD)
        rows.append({
            "device_id": device, "t": float(rec[senml.T]), "name": rec[senml.N],
            "unit": rec.get(senml.U), "value": rec.get(senml.V), "vs": rec.get(senml.VS),
            "vb": rec.get(senml.VB), "vd": vd.hex() if isinstance(vd, bytes) else None,
            "sum": rec.get(senml.S), "batch_seq": b.seq, "status": verdict.status,
            "timebase": b.timebase,
        })
    return rows


class Ingestor:
    """Verifies, classifies and stores one MQTT message at a time (no network I/O)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.keyring = Keyring(settings.limits.keyring_max_age_s)
        self.counts: dict[str, int] = {}

    def handle(self, topic: str, payload: bytes) -> Outcome:
        outcome = self._handle(topic, payload)
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        return outcome

    def _handle(self, topic: str, payload: bytes) -> Outcome:
        device_id = topic_device(topic)
        with Session(self.engine) as session:
            if device_id is None:
                log.warning("ignoring message on %r: not a readings topic", topic)
                return Outcome(BAD_TOPIC, None)
            device = session.get(Device, device_id)
            if device is None:
                self._event(session, device_id, UNKNOWN_DEVICE, None, "not registered")
                session.commit()
                return Outcome(UNKNOWN_DEVICE, device_id)
            if device.state not in (DeviceState.provisioned, DeviceState.active):
                self._event(session, device_id, NOT_ACCEPTING, None,
                            "device is %s" % device.state)
                session.commit()
                return Outcome(NOT_ACCEPTING, device_id)
            keys = TopicKeyring(self.keyring, device_id, session)
            verifier = BatchVerifier(keys, DbChainStates(session), decode=fastcbor.loads)
            verdict = verifier.check(payload)
            status = verdict.status
            if status == chain.UNKNOWN_KEY and keys.other_device is not None:
                status = TOPIC_MISMATCH
                self._event(session, device_id, status, None,
                            "signed with a key of %s" % keys.other_device)
            elif status == chain.BAD_SIGNATURE:
                self._forgery(session, device, verdict.reason)
            elif verdict.accepted:
                count = self._accept(session, device, verdict)
                session.commit()
                return Outcome(status, device_id, count)
            else:
                seq = verdict.batch.seq if verdict.batch is not None else None
                self._event(session, device_id, status, seq, verdict.reason[:512])
            session.commit()
            return Outcome(status, device_id)

    def _accept(self, session: Session, device: Device, verdict: chain.Verdict) -> int:
        b = verdict.batch
        now = time.time()
        count = 0
        if b.kind == batchmod.KIND_DROP:
            first, last, batches, readings = b.dropped
            self._event(session, device.id, "drop", b.seq, "device dropped seq %d..%d: "
                        "%d batches, %d readings" % (first, last, batches, readings),
                        explained=verdict.explained)
        else:
            rows = _readings(device.id, verdict, now)
            if rows:
                session.execute(insert(READING_TABLE), rows)
            count = len(rows)
        if verdict.status != chain.OK:
            self._event(session, device.id, verdict.status, b.seq, "", missing=verdict.missing)
        if device.state == DeviceState.provisioned:
            registry.set_state(session, device=device, state=DeviceState.active)
        device.last_seen = utcnow()
        session.add(device)
        return count

    def _forgery(self, session: Session, device: Device, reason: str) -> None:
        device.forgeries += 1
        session.add(device)
        self._event(session, device.id, chain.BAD_SIGNATURE, None, reason[:512])
        limit = self.settings.limits.quarantine_after_forgeries
        if device.forgeries >= limit and device.state != DeviceState.quarantined:
            registry.set_state(session, device=device, state=DeviceState.quarantined)
            audit.append(session, actor="ingest", action="device.quarantine",
                         outcome=audit.OK, target=device.id,
                         detail={"forgeries": device.forgeries})

    @staticmethod
    def _event(session: Session, device_id: str, status: str, seq: int | None, detail: str,
               missing: int = 0, explained: int = 0) -> None:
        session.add(IngestEvent(device_id=device_id, status=status, seq=seq, detail=detail,
                                missing=missing, explained=explained))


class MqttIngestWorker:
    """Runs an ``Ingestor`` on an MQTT 5 shared subscription (paho-mqtt, TLS client cert)."""

    def __init__(self, ingestor: Ingestor, settings: Settings) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = settings
        if s.mqtt_ca_file is None or s.mqtt_cert_file is None or s.mqtt_key_file is None:
            raise ValueError("the ingest needs CITYEDGE_MQTT_CA_FILE, CITYEDGE_MQTT_CERT_FILE "
                             "and CITYEDGE_MQTT_KEY_FILE (its client certificate); "
                             "or run `cityedge fleet serve --no-ingest`")
        self.ingestor = ingestor
        self.topic = "$share/%s/ce/v1/+/up/readings" % s.ingest_share_group
        self.settings = s
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        self.client.tls_set(ca_certs=str(s.mqtt_ca_file), certfile=str(s.mqtt_cert_file),
                            keyfile=str(s.mqtt_key_file))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self._props.SessionExpiryInterval = s.limits.ingest_session_expiry_s
        self._thread: threading.Thread | None = None

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the ingest: %s", reason)
            return
        self.connected.set()
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: int, reasons: Any,
                      _props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error("broker refused the subscription %s: %s", self.topic, reasons)

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()

    def _on_message(self, client: Any, _userdata: Any, msg: Any) -> None:
        attempts = self.settings.limits.ingest_attempts
        for attempt in range(1, attempts + 1):
            try:
                self.ingestor.handle(msg.topic, bytes(msg.payload))
                break
            except Exception:  # a database failure (lock timeout, lost connection)
                if attempt == attempts:
                    # unacknowledged: the broker redelivers it when the session reconnects
                    log.exception("ingest failed %d times on %s", attempts, msg.topic)
                    return
                time.sleep(self.settings.limits.ingest_retry_s * attempt)
        client.ack(msg.mid, msg.qos)

    def start(self) -> MqttIngestWorker:
        self.client.connect_async(self.settings.mqtt_host, self.settings.mqtt_port,
                                  keepalive=30, clean_start=False, properties=self._props)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def run_forever(self) -> None:
        self.client.connect(self.settings.mqtt_host, self.settings.mqtt_port, keepalive=30,
                            clean_start=False, properties=self._props)
        self.client.loop_forever(retry_first_connection=True)
