"""The ingest worker on MQTT: paho-mqtt (MQTT 5) in front of an ``ingest.Ingestor``.

It subscribes (QoS 1, persistent session: clean start off, session expiry
``ingest_session_expiry_s``) to ``ce/v1/+/up/readings``, ``.../up/relay``,
``.../up/result`` (a device's signed answer to a fleet command) and ``.../up/csr``, over
TLS with a client certificate: plain filters by default (``ingest_subscription=plain``, one
worker; Mosquitto saves them with the session, so a broker restart loses nothing), or the
shared subscriptions ``$share/<group>/...`` (``broker_acl.ingest_filters``) so several
workers split the load (Mosquitto 2.0 saves no shared subscription: docs/OPERATIONS.md
section 8).
paho's network thread only queues each message; the worker's own thread takes a group
(up to ``ingest_group_max_messages``, or whatever arrived within ``ingest_group_max_s``
of the group's first message), stores it in one transaction and only then acknowledges
every message of it (QoS 1, manual acks, in the order received).

No message holds back another: if the group's transaction fails, its messages are stored
one transaction each (``ingest_attempts`` tries, growing waits), each acknowledged after
its own commit. One that still fails alone is kept as a dead letter
(``ingest_dead_letter.keep``: topic, bytes, error, in its own transaction) and
acknowledged. If even that write fails, the database is down: the rest of the group stays
unacknowledged, and the worker tries the same messages again, waiting longer each time (up
to ``ingest_down_retry_max_s``), never moving on to later messages while it holds them. A
crash leaves them unacknowledged: the broker redelivers rather than loses them, and the
chain classifies anything stored twice as a duplicate. The CONNECT carries ``Receive
Maximum`` = ``ingest_receive_max`` so the broker keeps more than one group in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from cityedge_fleet import broker_acl, ingest_dead_letter
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_host import sd_notify
from cityedge_host.backoff import Backoff
from cityedge_host.errors import UserError

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.2  # seconds the ingest thread waits for a first message before re-checking
# seconds at most between reconnects (paho's default grows to 120): a broker back after an
# outage has devices' batches for the ingest at once
RECONNECT_MAX_S = 5


class MqttIngestWorker:
    """Runs an ``Ingestor`` on MQTT 5 shared subscriptions (paho-mqtt, TLS client cert)."""

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
        self.topics, self.other_topics = broker_acl.ingest_subscriptions(
            s.ingest_share_group, s.ingest_subscription)
        self.settings = s
        self.limits = s.limits
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.groups = 0  # transactions committed (a group, or one message of a failed one)
        self.dead_letters = 0  # messages kept aside (see ingest_dead_letter)
        # the last ``_try`` failed for want of the database, not for its messages
        # (``ingest_dead_letter.unavailable``): its messages are held, never kept aside
        self._unavailable = False
        self.database_down = 0  # rounds in which even a dead letter failed (then it waited)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._service = False  # run_forever: this worker is the process (tells systemd)
        self._watchdog = sd_notify.Pinger()
        self._told_ready = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        self.client.tls_set(ca_certs=str(s.mqtt_ca_file), certfile=str(s.mqtt_cert_file),
                            keyfile=str(s.mqtt_key_file))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.reconnect_delay_set(1, RECONNECT_MAX_S)
        self._props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self._props.SessionExpiryInterval = s.limits.ingest_session_expiry_s
        self._props.ReceiveMaximum = s.limits.ingest_receive_max

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the ingest: %s", reason)
            return
        self.connected.set()
        # always SUBSCRIBE again, also when the broker says the session is present: after
        # a restart Mosquitto restores the session and its queue but no shared
        # subscription. Unsubscribe the other mode's filters first (a worker switched
        # between plain and shared must not hold both: every message twice)
        client.unsubscribe(self.other_topics)
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: int, reasons: Any,
                      _props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
            if self._service and not self._told_ready:  # Type=notify: started once it
                self._told_ready = True  # takes messages; the pings follow from then on
                sd_notify.notify("READY=1\nSTATUS=ingest %s subscribed to %d filters"
                                 % (self.settings.mqtt_client_id, len(self.topics)))
        else:
            log.error("broker refused the subscriptions %s: %s", self.topics, reasons)

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        self._queue.put(msg)

    def _take_group(self) -> list[Any]:
        """Up to ``ingest_group_max_messages`` messages, waiting at most
        ``ingest_group_max_s`` after the first one."""
        try:
            group = [self._queue.get(timeout=IDLE_POLL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.limits.ingest_group_max_s
        most = self.limits.ingest_group_max_messages
        while len(group) < most:
            try:
                group.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                group.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return group

    def _store(self, group: list[Any]) -> bool:
        """Store and acknowledge every message of ``group``, in order. Returns False only
        if the worker is stopping with some of them unacknowledged (redelivered later)."""
        pending = list(group)
        down = Backoff(self.limits.ingest_retry_s, self.limits.ingest_down_retry_max_s)
        while pending:
            if len(pending) > 1 and self._try([self._message(m) for m in pending]) is None:
                self._acknowledge(pending)
                return True
            pending = self._one_by_one(pending)
            if pending and self._stopping.is_set():
                return False
            if pending:  # the database is down: hold them, try again, acknowledge nothing
                self.database_down += 1
                wait = down.next()
                log.error("database down: %d messages wait, next try in %.1f s",
                          len(pending), wait)
                if self._told_ready:  # alive and waiting: a restart would not help
                    self._watchdog.pet()
                if self._stopping.wait(wait):
                    return False
        return True

    def _one_by_one(self, pending: list[Any]) -> list[Any]:
        """Each message in its own transaction (``ingest_attempts`` tries); one that fails
        alone becomes a dead letter. Returns the messages left when even that fails."""
        for i, msg in enumerate(pending):
            topic, payload = self._message(msg)
            error = None
            for attempt in range(1, self.limits.ingest_attempts + 1):
                if self._stopping.is_set():
                    return pending[i:]
                error = self._try([(topic, payload)])
                if error is None:
                    break
                if attempt < self.limits.ingest_attempts:
                    time.sleep(self.limits.ingest_retry_s * attempt)
            if error is not None:
                # a poison message, or a database that is going down or coming back? Only
                # when the database takes a transaction now and the message still fails
                # right after, for a reason other than a lack of resources (a full disk
                # freed between the two had set a good batch aside), is it the message
                # (a database starting up failed the message's tries and then took its
                # dead letter)
                if self._unavailable or not self._database_up():
                    return pending[i:]
                error = self._try([(topic, payload)])
                if self._unavailable:
                    return pending[i:]
            if error is not None:
                try:
                    ingest_dead_letter.keep(self.ingestor.engine, topic, payload, error,
                                            self.limits.ingest_dead_letter_max_bytes)
                except Exception:
                    log.exception("cannot keep a dead letter either")
                    return pending[i:]
                self.dead_letters += 1
            self._acknowledge([msg])
        return []

    def _database_up(self) -> bool:
        """True if the database takes a (write) transaction now."""
        try:
            with self.ingestor.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite
                conn.exec_driver_sql("SELECT 1")
        except Exception as e:
            log.warning("database not taking transactions: %s", ingest_dead_letter.describe(e))
            return False
        return True

    def _try(self, messages: list[tuple[str, bytes]]) -> str | None:
        """One transaction; None if it committed, else what went wrong."""
        self._unavailable = False
        try:
            self.ingestor.handle_many(messages)
        except Exception as e:  # the database refused (a row, a lock, a lost connection)
            self._unavailable = ingest_dead_letter.unavailable(e)
            error = ingest_dead_letter.describe(e)
            log.warning("ingest failed on %d messages: %s", len(messages), error)
            return error
        self.groups += 1
        return None

    @staticmethod
    def _message(msg: Any) -> tuple[str, bytes]:
        try:
            topic = str(msg.topic)
        except UnicodeDecodeError:  # the broker checks UTF-8; a bad topic is bad_topic
            topic = ""
        return topic, bytes(msg.payload)

    def _acknowledge(self, messages: list[Any]) -> None:
        for msg in messages:
            self.client.ack(msg.mid, msg.qos)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._told_ready:
                self._watchdog.pet()  # this loop turns every IDLE_POLL_S at most
            group = self._take_group()
            if group:
                self._store(group)
            self._between_groups()

    def _between_groups(self) -> None:
        """Work of the storing thread between groups (the AMQP worker's presence events)."""

    def _start_thread(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The storing thread runs (``fleet serve``'s watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MqttIngestWorker:
        self._start_thread()
        self.client.connect_async(self.settings.mqtt_host, self.settings.mqtt_port,
                                  keepalive=30, clean_start=False, properties=self._props)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect_fail(self, *_args: Any) -> None:
        log.warning("%s; retrying", self.unreachable_text())

    def unreachable_text(self, reason: object = "no answer") -> str:
        s = self.settings
        return ("cannot reach the broker at %s:%d (%s): check that Mosquitto runs there with "
                "its TLS listener, and CITYEDGE_MQTT_HOST / CITYEDGE_MQTT_PORT"
                % (s.mqtt_host, s.mqtt_port, reason))

    def run_forever(self) -> None:
        """Connect, then consume until stopped. A broker that cannot be reached at the
        first try stops the command with one line (``UserError``) naming host and port:
        a service manager restarts it; once connected, paho reconnects by itself."""
        self._service = True
        self._start_thread()
        try:
            try:
                self.client.connect(self.settings.mqtt_host, self.settings.mqtt_port,
                                    keepalive=30, clean_start=False, properties=self._props)
            except OSError as e:
                raise UserError(self.unreachable_text(e.strerror or e)) from e
            self.client.loop_forever(retry_first_connection=True)
        finally:
            sd_notify.notify("STOPPING=1")
            self._stopping.set()
