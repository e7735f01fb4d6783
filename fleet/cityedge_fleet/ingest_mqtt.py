"""The ingest worker on MQTT: paho-mqtt (MQTT 5) in front of an ``ingest.Ingestor``.

It holds two shared subscriptions, ``$share/<group>/ce/v1/+/up/readings`` and
``.../up/relay``, over TLS with a client certificate, so several workers split the load.
paho's network thread only queues each message; the worker's own thread takes a group
(up to ``ingest_group_max_messages``, or whatever arrived within ``ingest_group_max_s``
of the group's first message), stores it in one transaction and only then acknowledges
every message of it (QoS 1, manual acks, in the order received). A crash or a database
failure leaves the group unacknowledged: the broker redelivers it rather than losing it,
and the chain classifies anything stored twice as a duplicate. The CONNECT carries
``Receive Maximum`` = ``ingest_receive_max`` so the broker keeps more than one group in
flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.2  # seconds the ingest thread waits for a first message before re-checking


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
        self.topics = ["$share/%s/ce/v1/+/up/%s" % (s.ingest_share_group, kind)
                       for kind in ("readings", "relay")]
        self.settings = s
        self.limits = s.limits
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.groups = 0  # transactions committed
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
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
        self._props.ReceiveMaximum = s.limits.ingest_receive_max

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the ingest: %s", reason)
            return
        self.connected.set()
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: int, reasons: Any,
                      _props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
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
        messages = [(m.topic, bytes(m.payload)) for m in group]
        attempts = self.limits.ingest_attempts
        for attempt in range(1, attempts + 1):
            try:
                self.ingestor.handle_many(messages)
                return True
            except Exception:  # a database failure (lock timeout, lost connection)
                if attempt == attempts:
                    # unacknowledged: the broker redelivers them when the session resumes
                    log.exception("ingest failed %d times on a group of %d messages",
                                  attempts, len(group))
                    return False
                time.sleep(self.limits.ingest_retry_s * attempt)
        return False

    def _run(self) -> None:
        while not self._stopping.is_set():
            group = self._take_group()
            if group and self._store(group):
                self.groups += 1
                for msg in group:
                    self.client.ack(msg.mid, msg.qos)

    def _start_thread(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

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

    def run_forever(self) -> None:
        self._start_thread()
        try:
            self.client.connect(self.settings.mqtt_host, self.settings.mqtt_port,
                                keepalive=30, clean_start=False, properties=self._props)
            self.client.loop_forever(retry_first_connection=True)
        finally:
            self._stopping.set()
