"""The ingest worker on a RabbitMQ cluster: AMQP 0-9-1 (pika) in front of an ``Ingestor``.

The same worker as ``ingest_mqtt.MqttIngestWorker`` (whose storing loop it reuses: groups,
one transaction per group, each message acknowledged only after its commit, dead letters,
waiting out a database that is down); only the transport differs. Devices publish MQTT to
the cluster, which routes every ``up/`` message into the quorum queue
``broker_rabbitmq.INGEST_QUEUE``; the workers are its competing consumers (each holds at
most ``INGEST_PREFETCH`` unacknowledged messages), over TLS with the ingest's client
certificate (SASL ``EXTERNAL``: the certificate's CN is the user).

A worker connects to the first node of ``ingest_amqp_nodes`` that answers and moves to the
next when its node goes away (jittered backoff between rounds). A delivery is acknowledged
on the channel that delivered it and only while that channel is open: delivery tags count
per channel, so an ack sent on a newer channel would acknowledge another message. Whatever
was unacknowledged when a channel closed is delivered again by RabbitMQ (to this worker or
another); the chain classifies a batch stored twice as a duplicate.

Presence: MQTT 3.1.1 tells the command publisher nothing of a device that is away (no
"no matching subscribers"), so a command sent meanwhile would wait for its resend. The
worker also consumes the cluster's event exchange (an exclusive queue of its own, bound
to ``binding.created``): when a device binds its own ``down/cmd`` again (its SUBSCRIBE
after a reconnect, ``broker_rabbitmq.subscribed_device``), its unanswered commands are
made due at once (``Ingestor.devices_subscribed``; the publisher is woken in ``fleet
serve``). The devices seen are gathered in a set that the storing thread turns into one
UPDATE between groups (at most every ``IDLE_POLL_S``), so a device reconnecting in a loop
costs no more than one; events missed while the worker is away are covered by the
resend. A cluster without the event exchange plugin (one
configured before it) is consumed as before, with a warning.
"""

from __future__ import annotations

import functools
import logging
import queue
import secrets
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet import ingest_dead_letter
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker
from cityedge_host import sd_notify
from cityedge_host.backoff import Backoff

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_S = 10  # a node that stops answering is noticed within about twice this
RETRY_FIRST_S = 0.2  # the first wait after a round over every node failed
RETRY_MAX_S = 5.0
PRESENCE_PENDING_MAX = 100_000  # devices waiting for the storing thread; more are dropped


@dataclass(frozen=True)
class Delivery:
    """One message and where to acknowledge it."""

    connection: Any  # pika.BlockingConnection
    channel: Any
    tag: int
    topic: str  # the MQTT topic (the routing key turned back)
    payload: bytes
    qos: int = 1


def parse_nodes(text: str | list[str]) -> list[tuple[str, int]]:
    """``host:port,host:port`` (the AMQP TLS listeners of the cluster's nodes)."""
    items = text if isinstance(text, list) else [t for t in text.split(",") if t.strip()]
    out = []
    for item in items:
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("ingest_amqp_nodes: %r is not host:port" % item)
        out.append((host, int(port)))
    if not out:
        raise ValueError("ingest_amqp_nodes: name at least one host:port")
    return out


class AmqpIngestWorker(MqttIngestWorker):
    """Runs an ``Ingestor`` as a competing consumer of the cluster's ingest queue."""

    def __init__(self, ingestor: Ingestor, settings: Settings) -> None:
        # not the MQTT client's constructor: the storing loop's state, then AMQP's
        s = settings
        if s.mqtt_ca_file is None or s.mqtt_cert_file is None or s.mqtt_key_file is None:
            raise ValueError("the ingest needs CITYEDGE_MQTT_CA_FILE, CITYEDGE_MQTT_CERT_FILE "
                             "and CITYEDGE_MQTT_KEY_FILE (its client certificate)")
        self.ingestor = ingestor
        self.settings = s
        self.limits = s.limits
        self.nodes = parse_nodes(s.ingest_amqp_nodes)
        self.topics = [rmq.INGEST_QUEUE]
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.groups = 0
        self.dead_letters = 0
        self.database_down = 0
        self.reconnects = 0  # connections made after the first
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._amqp_thread: threading.Thread | None = None
        self._service = False
        self._watchdog = sd_notify.Pinger()
        self._told_ready = False
        self._tls = ssl.create_default_context(cafile=str(s.mqtt_ca_file))
        self._tls.load_cert_chain(str(s.mqtt_cert_file), str(s.mqtt_key_file))
        self._connection: Any = None
        self.presence_events = 0  # devices seen subscribing again (acted on)
        self.presence_due = 0  # commands those made due
        self._present: set[str] = set()  # waiting for the storing thread
        self._present_lock = threading.Lock()

    # -- the transport ------------------------------------------------------------------

    def _parameters(self) -> list[Any]:
        import pika

        return [pika.ConnectionParameters(
            host=host, port=port, virtual_host=rmq.VHOST,
            credentials=pika.credentials.ExternalCredentials(),
            ssl_options=pika.SSLOptions(self._tls, server_hostname=host),
            heartbeat=HEARTBEAT_S, blocked_connection_timeout=30,
            socket_timeout=CONNECT_TIMEOUT_S, connection_attempts=1)
            for host, port in self.nodes]

    def _on_delivery(self, connection: Any, channel: Any, method: Any, _props: Any,
                     body: bytes) -> None:
        try:
            topic = rmq.topic_of(method.routing_key)
        except (TypeError, AttributeError):
            topic = ""
        self._queue.put(Delivery(connection, channel, method.delivery_tag, topic, bytes(body)))

    def _consume_once(self) -> None:
        """Connect to the first node that answers and consume until the connection ends."""
        import pika

        connection = pika.BlockingConnection(self._parameters())
        try:
            self._connection = connection
            channel = connection.channel()
            channel.basic_qos(prefetch_count=rmq.INGEST_PREFETCH)
            channel.basic_consume(rmq.INGEST_QUEUE, functools.partial(
                self._on_delivery, connection), auto_ack=False)
            self._watch_presence(connection)
            self.connected.set()
            self.subscribed.set()
            if self._service and not self._told_ready:
                self._told_ready = True
                sd_notify.notify("READY=1\nSTATUS=ingest consuming %s" % rmq.INGEST_QUEUE)
            while not self._stopping.is_set() and connection.is_open:
                connection.process_data_events(time_limit=0.2)
        finally:
            self.connected.clear()
            self.subscribed.clear()
            self._connection = None
            if connection.is_open:
                try:
                    connection.close()
                except Exception:  # closing a broken connection
                    log.debug("closing the AMQP connection failed", exc_info=True)

    def _watch_presence(self, connection: Any) -> None:
        """The presence queue on a channel of its own (a refusal closes only that one)."""
        import pika

        try:
            channel = connection.channel()
            name = rmq.PRESENCE_QUEUE_PREFIX + secrets.token_hex(8)
            channel.queue_declare(name, exclusive=True, auto_delete=True, arguments={
                "x-max-length": rmq.PRESENCE_QUEUE_MAX, "x-overflow": "drop-head"})
            channel.queue_bind(name, rmq.EVENT_EXCHANGE, rmq.PRESENCE_KEY)
            channel.basic_consume(name, self._on_presence, auto_ack=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            log.warning("no presence events from the cluster (%s): commands to a device "
                        "that was away wait for their resend; run `cityedge broker config` "
                        "again and restart the nodes (rabbitmq_event_exchange)", e)

    def _on_presence(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        device = rmq.subscribed_device(props.headers)
        if device is None:
            return
        with self._present_lock:
            if len(self._present) < PRESENCE_PENDING_MAX:
                self._present.add(device)

    def _between_groups(self) -> None:
        with self._present_lock:
            devices, self._present = sorted(self._present), set()
        if not devices:
            return
        try:
            self.presence_due += self.ingestor.devices_subscribed(devices)
            self.presence_events += len(devices)
        except Exception as e:  # the database is down: the resend covers them
            log.warning("presence of %d devices not recorded: %s", len(devices),
                        ingest_dead_letter.describe(e))

    def _amqp_loop(self) -> None:
        backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
        first = True
        while not self._stopping.is_set():
            try:
                if not first:
                    self.reconnects += 1
                first = False
                self._consume_once()
                backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
            except Exception as e:  # a node down, a TLS or AMQP refusal
                log.warning("%s; retrying", self.unreachable_text(e))
                self._stopping.wait(backoff.next())

    @staticmethod
    def _message(msg: Any) -> tuple[str, bytes]:
        return msg.topic, msg.payload

    def _acknowledge(self, messages: list[Any]) -> None:
        for d in messages:
            if d.channel.is_open and d.connection.is_open:
                try:
                    d.connection.add_callback_threadsafe(
                        functools.partial(self._ack_if_open, d))
                except Exception:  # closed meanwhile: redelivered
                    log.debug("ack of %d not sent (connection closed)", d.tag)

    @staticmethod
    def _ack_if_open(d: Delivery) -> None:
        if d.channel.is_open:
            d.channel.basic_ack(d.tag)

    def start(self) -> AmqpIngestWorker:
        self._start_thread()
        self._amqp_thread = threading.Thread(target=self._amqp_loop, name="ingest-amqp",
                                             daemon=True)
        self._amqp_thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._amqp_thread is not None:
            self._amqp_thread.join(10)

    def _on_connect_fail(self, *_args: Any) -> None:
        log.warning("%s; retrying", self.unreachable_text())

    def unreachable_text(self, reason: object = "no answer") -> str:
        return ("cannot consume %s from any of %s (%s): check that the RabbitMQ nodes run "
                "with their AMQP TLS listeners, and CITYEDGE_INGEST_AMQP_NODES"
                % (rmq.INGEST_QUEUE, ", ".join("%s:%d" % n for n in self.nodes), reason))

    def run_forever(self) -> None:
        """Consume until stopped (a node that is down is retried; the service manager
        sees READY once the first consumer runs)."""
        self._service = True
        self._start_thread()
        try:
            self._amqp_loop()
        finally:
            sd_notify.notify("STOPPING=1")
            self._stopping.set()
