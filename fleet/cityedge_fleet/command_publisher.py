"""Delivering fleet commands: ``fleet serve``'s thread that publishes each pending command on
``ce/v1/<device>/down/cmd`` (QoS 1) as the ``fleet-commands`` identity (its certificate's
CN is its client id: ``client_id_of``), again and again until the device answers, the
command expires or someone cancels it.

How the fleet knows whether the device got it: a device subscribes to its ``down/cmd``
with a clean session on every connect, so on Mosquitto (MQTT 5) the broker's PUBACK says
whether the device was there. Reason code 0 means the broker had the device's
subscription and delivered to it (the command becomes ``sent``); 16 ("no matching
subscribers", MQTT 5) means the device is not connected and the broker dropped the
message, which cost the device nothing.

RabbitMQ 3.10 (``CITYEDGE_BROKER_ENGINE=rabbitmq``) speaks MQTT 3.1.1 only: it cannot
parse an MQTT 5 CONNECT and closes the connection without a CONNACK, so the publisher
speaks 3.1.1 there (``protocol_for``). A 3.1.1 PUBACK has no reason code: every
acknowledged command counts as delivered, whether the device was there or not, and one
sent while the device was away waits for the resend below or for the device's return
after a silence (docs/BROKERS.md). So:

- a device that is **not there** (MQTT 5 only) is tried again every
  ``command_absent_retry_s`` (jittered): the first try after it reconnects reaches it, at
  most that long after;
- a device that is **back after a silence** (the ingest takes its first batch after
  ``command_silence_s`` without one: ``ingest``) has its unanswered commands made due at
  once, and the ingest in ``fleet serve`` wakes this thread: no wait at all;
- a command **delivered but not answered** (the device was cut before it could answer,
  or its answer was lost) is sent again after ``command_resend_s``, doubling up to
  ``command_resend_max_s`` (jittered): each re-send costs the device a check, and the
  device refuses a seq it took already (and answers it again, once its firmware does);
- every try stops at the command's expiry (it becomes ``expired``, audited), its result
  or its cancellation. A round sends at most ``command_round_max``; a device's commands go
  out in seq order (the device refuses a seq below one it took).

Rounds run every ``command_poll_s`` and whenever woken (a command queued through the API
of this process, a device back). Several publishers (API replicas) may run: a command is
*claimed* for a try by a conditional update of its ``next_try_at`` (a lease), so two
never send it in the same round, and one that dies mid-round leaves it to the next after
the lease. No database transaction stays open while the broker is waited for.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion
from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_core import topics
from cityedge_fleet import audit, command_queue, rotation
from cityedge_fleet.config import Settings
from cityedge_fleet.models import utcnow
from cityedge_host.backoff import Backoff

log = logging.getLogger(__name__)
DELIVERED = 0  # PUBACK reason: the broker had a subscriber and delivered to it
NO_SUBSCRIBERS = 16  # PUBACK reason (MQTT 5): nobody subscribed, the message is dropped
JITTER = 0.25  # of every retry delay (a campaign's commands do not come back in step)


def client_id_of(cert_file: Path) -> str:
    """The publisher's MQTT client id: its certificate's CN (``fleet-commands``, or
    ``fleet-commands-<suffix>`` for another replica), which RabbitMQ requires (it refuses
    another id: docs/BROKERS.md) and Mosquitto puts in place of any id anyway."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError("CITYEDGE_COMMANDS_CERT_FILE %s: not a readable PEM certificate "
                         "(%s)" % (cert_file, e)) from e
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cns:
        raise ValueError("CITYEDGE_COMMANDS_CERT_FILE %s: the certificate has no CN (issue "
                         "it with `cityedge ca issue-service --cn fleet-commands`)" % cert_file)
    return str(cns[0].value)


def protocol_for(broker_engine: str) -> MQTTProtocolVersion:
    """The MQTT version (paho's constant) the publisher speaks to ``broker_engine``: 5
    where the PUBACK tells an absent device (Mosquitto), 3.1.1 on RabbitMQ 3.10, whose
    MQTT plugin takes nothing newer."""
    return (MQTTProtocolVersion.MQTTv311 if broker_engine == "rabbitmq"
            else MQTTProtocolVersion.MQTTv5)


@dataclass
class Round:
    """What one round did."""

    expired: list[int] = field(default_factory=list)  # command ids now expired
    delivered: list[int] = field(default_factory=list)  # reached the device's subscription
    absent: list[int] = field(default_factory=list)  # the device was not at the broker
    failed: list[int] = field(default_factory=list)  # refused or not acknowledged in time

    @property
    def tried(self) -> int:
        return len(self.delivered) + len(self.absent) + len(self.failed)


@dataclass(frozen=True)
class _Try:
    id: int
    device_id: str
    signed: bytes
    sends: int


class CommandPublisher:
    """Publishes due commands (module docstring); ``round()`` is one pass, the thread
    (``start``) runs rounds."""

    def __init__(self, engine: Engine, settings: Settings,
                 rand: Callable[[], float] | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        s = settings
        if s.mqtt_ca_file is None or s.commands_cert_file is None or \
                s.commands_key_file is None:
            raise ValueError("the command publisher needs CITYEDGE_MQTT_CA_FILE, "
                             "CITYEDGE_COMMANDS_CERT_FILE and CITYEDGE_COMMANDS_KEY_FILE (the "
                             "fleet-commands certificate: `cityedge ca issue-service --cn "
                             "fleet-commands`)")
        self.engine = engine
        self.settings = s
        self.limits = s.limits
        self._rand = rand
        self.rounds = 0
        self.connected = threading.Event()
        self._acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self._acked = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.protocol = protocol_for(s.broker_engine)
        self.client_id = client_id_of(s.commands_cert_file)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=self.protocol)
        self.client.tls_set(ca_certs=str(s.mqtt_ca_file), certfile=str(s.commands_cert_file),
                            keyfile=str(s.commands_key_file))
        self.client.max_inflight_messages_set(max(20, min(s.limits.command_round_max, 1000)))
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    # -- MQTT ---------------------------------------------------------------------------

    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the command publisher: %s", reason)
            return
        self.connected.set()
        self._wake.set()  # what waited for the broker goes out now

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        self.connected.clear()
        if reason.is_failure:  # e.g. a broker that closes an MQTT 5 CONNECT unanswered
            log.warning("command publisher lost the broker (%s:%d): %s; reconnecting",
                        self.settings.mqtt_host, self.settings.mqtt_port, reason)

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: Any,
                    _props: Any) -> None:
        with self._acked:
            self._acks[mid] = int(getattr(reason, "value", reason))
            self._acked.notify_all()

    def open(self) -> CommandPublisher:
        """Connect (in the background; reconnects on its own)."""
        self.client.connect_async(self.settings.mqtt_host, self.settings.mqtt_port,
                                  keepalive=30)
        self.client.loop_start()
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- rounds -------------------------------------------------------------------------

    def wake(self, _devices: object = None) -> None:
        """Run a round now (a command was queued, a device is back)."""
        self._wake.set()

    def round(self, now: dt.datetime | None = None) -> Round:
        """Expire what is due to expire, then try every due command once."""
        now = now or utcnow()
        done = Round()
        with Session(self.engine) as session:
            for cmd in rotation.expire_commands(session, now):
                done.expired.append(cmd.id or 0)
                audit.append(session, actor="fleet", action="command.expire",
                             outcome=audit.OK, target=cmd.device_id,
                             detail={"command": cmd.id, "seq": cmd.seq, "name": cmd.name,
                                     "sends": cmd.sends})
            session.commit()
        self.rounds += 1
        if not self.connected.is_set():
            return done  # nothing claimed: the next round after the connection sends
        tries = self._claim(now)
        if tries:
            self._publish(tries, now, done)
        return done

    def _claim(self, now: dt.datetime) -> list[_Try]:
        lease_s = 2 * self.limits.command_publish_timeout_s + self.limits.command_poll_s
        with Session(self.engine) as session:
            tries = [_Try(c.id or 0, c.device_id, c.signed, c.sends)
                     for c in command_queue.due(session, now, self.limits.command_round_max)
                     if command_queue.claim(session, c, now, lease_s)]
            session.commit()
        return tries

    def _publish(self, tries: list[_Try], now: dt.datetime, done: Round) -> None:
        with self._acked:  # rounds do not overlap: what is here came too late for its own
            self._acks.clear()
        mids: dict[int, _Try] = {}
        for t in tries:
            info = self.client.publish(topics.down(t.device_id, topics.CMD), t.signed, qos=1)
            if info.rc != 0:  # not even queued (disconnected meanwhile): the lease retries
                done.failed.append(t.id)
                continue
            mids[info.mid] = t
        acks = self._wait_for(set(mids), self.limits.command_publish_timeout_s)
        with Session(self.engine) as session:
            for mid, t in mids.items():
                reason = acks.get(mid)
                if reason is None or reason >= 0x80:
                    done.failed.append(t.id)
                    if reason is not None:
                        log.error("broker refused command %d for %s: reason %d", t.id,
                                  t.device_id, reason)
                    continue  # its lease runs out and a later round tries again
                delivered = reason == DELIVERED
                wait = self._resend_after(t.sends + 1) if delivered else self._absent_wait()
                command_queue.record_try(session, t.id, delivered=delivered, now=now,
                                         next_try_at=now + dt.timedelta(seconds=wait))
                (done.delivered if delivered else done.absent).append(t.id)
            session.commit()

    def _wait_for(self, mids: set[int], timeout_s: float) -> dict[int, int]:
        """The PUBACK reason of each of ``mids`` that came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while not mids <= self._acks.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._acked.wait(left)
            return {mid: self._acks[mid] for mid in mids if mid in self._acks}

    def _resend_after(self, sends: int) -> float:
        lim = self.limits
        backoff = Backoff(lim.command_resend_s, lim.command_resend_max_s, JITTER,
                          **({"rand": self._rand} if self._rand else {}))
        backoff.attempts = max(0, sends - 1)
        return backoff.next()

    def _absent_wait(self) -> float:
        lim = self.limits
        return Backoff(lim.command_absent_retry_s, lim.command_absent_retry_s, JITTER,
                       **({"rand": self._rand} if self._rand else {})).next()

    # -- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # a database or broker fault: the next round tries again
                log.exception("command publisher round failed")
            self._wake.wait(self.limits.command_poll_s)
            self._wake.clear()

    def start(self) -> CommandPublisher:
        self.open()
        self._thread = threading.Thread(target=self._loop, name="command-publisher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.close()
