"""A paho MQTT client for tests that records what the broker did to it.

``Probe(broker, creds)`` connects over TLS with a certificate and keeps every event it
sees: CONNACKs, SUBACK reason codes, messages, disconnects. Tests wait for events with
``wait_for`` (a condition on the recorded state), never for a fixed time.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from support.mosquitto import Credentials, Mosquitto

WAIT_S = 60.0  # seconds any single expected broker event may take on a busy machine (a
# condition wait: it ends as soon as the event is seen; 20 s ran out under a loaded CI)


class Probe:
    def __init__(self, broker: Mosquitto, creds: Credentials, client_id: str = "",
                 v5: bool = True, ca: Any = None, session_expiry_s: int = 0) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.tls_set(ca_certs=str(ca or broker.pki.ca_pem), certfile=str(creds.cert_pem),
                            keyfile=str(creds.key_pem), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(60, 120)  # a kicked probe stays out: tests see it
        self.lock = threading.Condition()
        self.connects = 0
        self.disconnects = 0
        self.subacks: dict[int, list[bool]] = {}  # mid -> granted per filter
        self.pubacks: dict[int, int] = {}  # mid -> reason code (v5) or 0
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        props = None
        if session_expiry_s:  # a persistent session (MQTT 5), kept after a disconnect
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
        if v5:
            self.client.connect("127.0.0.1", broker.port, keepalive=30,
                                clean_start=not session_expiry_s, properties=props)
        else:
            self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        # TLS 1.3 checks the client certificate after the client's handshake is done: a
        # refused certificate shows as a connection closed before any CONNACK
        self.wait_for(lambda: self.connects >= 1 or self.disconnects >= 1, "CONNACK")
        if not self.connects:
            self.close()
            raise ConnectionRefusedError("the broker closed the connection before CONNACK")

    def _note(self, fn: Callable[[], None]) -> None:
        with self.lock:
            fn()
            self.lock.notify_all()

    def _on_connect(self, *_a: Any) -> None:
        self._note(lambda: setattr(self, "connects", self.connects + 1))

    def _on_disconnect(self, *_a: Any) -> None:
        self._note(lambda: setattr(self, "disconnects", self.disconnects + 1))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        self._note(lambda: self.subacks.__setitem__(mid, [not r.is_failure for r in reasons]))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._note(lambda: self.pubacks.__setitem__(mid, int(reason.value)))

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self._note(lambda: self.messages.append((msg.topic, bytes(msg.payload))))

    def wait_for(self, cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no %s within %.0f s" % (what, timeout))
                self.lock.wait(left)

    def subscribe(self, topic: str, qos: int = 1) -> bool:
        """Subscribe; True when the broker granted it."""
        _rc, mid = self.client.subscribe(topic, qos=qos)
        self.wait_for(lambda: mid in self.subacks, "SUBACK for %s" % topic)
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Publish at QoS 1 and wait for the PUBACK; its reason code (below 0x80 accepted:
        0 delivered, 0x10 no subscriber; 0x87 = 135 not authorized)."""
        info = self.client.publish(topic, payload, qos=qos)
        self.wait_for(lambda: info.mid in self.pubacks, "PUBACK for %s" % topic)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def leave(self, broker: Mosquitto, client_id: str, timeout: float = WAIT_S) -> None:
        """Close, then wait until the broker has ended the session: its log has the line
        for ``client_id`` (the certificate's CN: ``use_username_as_clientid``). ``close``
        alone returns once DISCONNECT is sent, and a publish on another connection can
        still reach the broker first and find the subscription. Mosquitto writes the line
        while it handles the disconnect and frees a clean session's subscriptions at the
        top of its next loop, before it reads anything sent after the line."""
        ends = ("Client %s disconnected." % client_id,
                "Client %s closed its connection." % client_id)

        def count() -> int:
            log = broker.read_log()
            return sum(log.count(e) for e in ends)

        before = count()
        self.close()
        deadline = time.monotonic() + timeout
        while count() <= before:
            if time.monotonic() > deadline:
                raise AssertionError("the broker did not end %s's session within %.0f s"
                                     % (client_id, timeout))
            time.sleep(0.02)
