"""Talking to Mosquitto's dynamic security plugin: JSON commands over MQTT.

The plugin takes ``{"commands": [...]}`` on ``$CONTROL/dynamic-security/v1`` and answers
on ``.../response`` with one ``{"responses": [...]}`` message per request message, each
response carrying the command's ``correlationData`` and, on failure, an ``error`` text.
``BrokerControl.run`` sends one request and waits for its answer; the connection (TLS
with the ``fleet-control`` certificate, whose role allows nothing else) is opened on
first use and kept. A broker that does not answer in time is a ``BrokerUnavailable``:
the caller decides whether to refuse (enrollment) or retry later (``broker_sync``).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from cityedge_core.errors import LocalError
from cityedge_fleet.broker_acl import CONTROL_RESPONSE_TOPIC, CONTROL_TOPIC

log = logging.getLogger(__name__)


class BrokerUnavailable(LocalError):
    """The broker cannot be reached, or did not answer a control request in time."""


class CommandFailed(LocalError):
    """The plugin refused a command (its error text is the message)."""


class BrokerControl:
    """A control-topic client of one broker (thread-safe; one request at a time)."""

    def __init__(self, host: str, port: int, *, ca_file: Path, cert_file: Path,
                 key_file: Path, timeout_s: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._tls = (ca_file, cert_file, key_file)
        self._client: Any = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._answer = threading.Event()
        self._waiting: str | None = None
        self._response: dict[str, Any] | None = None

    def _connect(self) -> Any:
        if self._client is not None and self._ready.is_set():
            return self._client
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        if self._client is not None:
            self._close_client()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-control",
                             protocol=mqtt.MQTTv5)
        ca, cert, key = self._tls
        client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._ready.clear()
        try:
            client.connect(self.host, self.port, keepalive=30)
        except OSError as e:
            raise BrokerUnavailable("cannot reach the broker at %s:%d: %s"
                                    % (self.host, self.port, e)) from e
        client.loop_start()
        self._client = client
        if not self._ready.wait(self.timeout_s):
            self._close_client()
            raise BrokerUnavailable("the broker at %s:%d did not accept fleet-control in "
                                    "%.0f s" % (self.host, self.port, self.timeout_s))
        return client

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            log.error("the broker refused fleet-control: %s", reason)
            return
        client.subscribe(CONTROL_RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: int, reasons: Any,
                      _props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._ready.set()
        else:
            log.error("the broker refused fleet-control's subscription: %s", reasons)

    def _on_disconnect(self, *_args: Any) -> None:
        self._ready.clear()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            data = json.loads(msg.payload)
            responses = data["responses"]
            tag = responses[0].get("correlationData") if responses else None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            log.warning("ignoring a malformed control response")
            return
        if tag is not None and tag == self._waiting:
            self._response = data
            self._answer.set()

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self._ready.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` as one request; returns the plugin's responses in order.

        Each response is ``{"command": name, "error"?: text, "data"?: ...}``; this does
        not raise for a command's own error (the caller knows which errors are fine,
        say "Client already exists"), only for a broker that cannot be asked.
        """
        if not commands:
            return []
        with self._lock:
            client = self._connect()
            tag = secrets.token_hex(8)
            body = [dict(c, correlationData="%s-%d" % (tag, i)) for i, c in enumerate(commands)]
            self._waiting = body[0]["correlationData"]
            self._response = None
            self._answer.clear()
            info = client.publish(CONTROL_TOPIC, json.dumps({"commands": body}), qos=1)
            if info.rc != 0 or not self._answer.wait(self.timeout_s):
                self._close_client()
                raise BrokerUnavailable("the broker at %s:%d did not answer a control "
                                        "request in %.0f s" % (self.host, self.port,
                                                               self.timeout_s))
            response = self._response
            assert response is not None
            responses: list[dict[str, Any]] = response.get("responses", [])
            if len(responses) != len(commands):
                raise CommandFailed("the broker answered %d of %d commands"
                                    % (len(responses), len(commands)))
            return responses

    def close(self) -> None:
        with self._lock:
            self._close_client()


def check(responses: list[dict[str, Any]], fine: tuple[str, ...] = ()) -> None:
    """Raise ``CommandFailed`` for the first response whose error is not in ``fine``."""
    for r in responses:
        error = r.get("error")
        if error and error not in fine:
            raise CommandFailed("broker %s: %s" % (r.get("command", "?"), error))
