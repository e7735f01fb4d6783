"""The link to downstream nodes: their batches arrive through the site's local broker.

Nodes publish their signed batches, QoS 1, on ``ce/v1/<node>/up/readings`` to a broker on
the site network (a local Mosquitto with the same mTLS and ``%u`` ACL as the city's). The
gateway holds a persistent session there (``clean_session=False``) and acknowledges each
message *only after* it is durably stored (``manual_ack``): until then the local broker
keeps it and redelivers it after a gateway crash. Rejected batches are acknowledged too
(they would fail the same way again) and counted per node by ``NodeRelay``.

aiomqtt has no public switch for manual acknowledgements, so ``forwarder.paho_client``
reaches the paho client it wraps; that seam is kept to that one function.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiomqtt

from cityedge_core import topics
from cityedge_core.errors import StorageError
from cityedge_host.backoff import Backoff
from cityedge_host.mqtt_client import FailFastClient

from . import limits
from .config import BrokerConfig
from .forwarder import paho_client, tls_context
from .relay import NodeRelay

log = logging.getLogger(__name__)

TOPIC = topics.every_up(topics.READINGS)  # every node's batches on the site's broker


def topic_device(topic: str) -> str | None:
    """The node a ``ce/v1/<node>/up/readings`` topic names, else None."""
    parsed = topics.parse(topic)
    if parsed is None or parsed[1:] != (topics.UP, topics.READINGS):
        return None
    return parsed[0]


class NodeListener:
    def __init__(
        self, cfg: BrokerConfig, device: str, relay: NodeRelay, notify: Callable[[], None]
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.relay = relay
        self.notify = notify  # wakes the forwarder after a commit
        self.connected = False
        self.bad_topics = 0
        self._ctx = tls_context(cfg)

    async def run(self) -> None:
        backoff = Backoff(limits.MQTT_BACKOFF_MIN_S, limits.MQTT_BACKOFF_MAX_S)
        while True:
            client = FailFastClient(
                self.cfg.host,
                self.cfg.port,
                identifier=self.device + "-relay",
                clean_session=False,
                tls_context=self._ctx,
                keepalive=self.cfg.keepalive_s,
                max_inflight_messages=self.cfg.inflight,
            )
            paho_client(client).manual_ack_set(True)
            try:
                async with client:
                    await client.subscribe(TOPIC, qos=1)
                    self.connected = True
                    backoff.reset()
                    await self._serve(client)
            except aiomqtt.MqttError as e:
                log.warning("node link down: %s", e)
            finally:
                self.connected = False
            await asyncio.sleep(backoff.next())

    async def _serve(self, client: aiomqtt.Client) -> None:
        paho = paho_client(client)
        # Whatever was checked but not committed on an earlier connection was not
        # acknowledged and comes again: forget it, or it would look like a duplicate.
        self.relay.rollback()
        pending: list[tuple[int, int, Any]] = []  # (mid, qos, decision)
        wake = asyncio.Event()

        async def committer() -> None:
            while True:
                await wake.wait()
                await asyncio.sleep(limits.COMMIT_INTERVAL_S)  # gather a group
                wake.clear()
                group = pending[:]
                del pending[: len(group)]
                try:
                    self.relay.commit([d for _, _, d in group if d is not None])
                except StorageError as e:
                    # Nothing of the group is acknowledged: reconnecting makes the local
                    # broker redeliver it, and the relay's chain state was rolled back.
                    log.error("cannot store node batches: %s; reconnecting", e)
                    paho.disconnect()
                    return
                for mid, qos, _ in group:
                    paho.ack(mid, qos)
                self.notify()

        task = asyncio.create_task(committer())
        try:
            async for msg in client.messages:
                device = topic_device(str(msg.topic))
                payload = msg.payload
                if device is None or not isinstance(payload, bytes | bytearray):
                    self.bad_topics += 1
                    pending.append((msg.mid, msg.qos, None))
                else:
                    d = self.relay.check(device, bytes(payload))
                    pending.append((msg.mid, msg.qos, d if d.relayed is not None else None))
                wake.set()
        finally:
            task.cancel()
