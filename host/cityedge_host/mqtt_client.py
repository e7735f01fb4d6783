"""The MQTT client of the gateway and the fast devices: aiomqtt's, except that a
connection the broker closes before its CONNACK fails the connect at once.

aiomqtt (2.5) ignores a disconnect that comes before the CONNACK and waits out the
client's whole ``timeout`` (10 s here). That is what a device or gateway meets whenever
the broker refuses it after the TLS handshake (a revoked certificate: TLS 1.3 ends the
client's side of the handshake before the server has checked the client's certificate)
or goes down in the middle of a connect (a restart, a herd of reconnects): each try lost
10 s instead of failing and backing off. Needs the ``gateway`` part (aiomqtt).
"""

from __future__ import annotations

from typing import Any

import aiomqtt

CLOSED_BEFORE_CONNACK = "the broker closed the connection before its CONNACK"


class FailFastClient(aiomqtt.Client):
    """``aiomqtt.Client`` whose connect fails as soon as the connection closes, and whose
    unexpected disconnects are not left for the collector to report."""

    _awaiting_connack = False

    async def __aenter__(self) -> FailFastClient:
        self._awaiting_connack = True
        try:
            await super().__aenter__()
        finally:
            self._awaiting_connack = False
        return self

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        if self._awaiting_connack and not self._connected.done():
            # taken by the connect waiting on it (``__aenter__``): never left unretrieved
            self._connected.set_exception(aiomqtt.MqttError(
                "%s (%s)" % (CLOSED_BEFORE_CONNACK, reason_code)))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        if self._disconnected.done():
            # looked at once, so that a drop nobody was waiting on (a keepalive timeout
            # between two publishes) is not logged as "Future exception was never
            # retrieved" when the client is collected; whoever awaits it still gets it
            self._disconnected.exception()
