"""Forwarding the buffer to the city broker: MQTT over TLS (client certificate), QoS 1.

``Forwarder.run()`` keeps a connection up (reconnecting with jittered exponential backoff;
a broker that is down at boot is normal) and publishes buffered batches oldest first, with
up to ``inflight`` publishes awaiting PUBACK at once. A batch is deleted from the store only
after its PUBACK (deletions are grouped). After a reconnect it starts again from the oldest
row: a batch whose PUBACK was lost is sent twice, and the ingest recognises the duplicate
by its hash (``chain.DUPLICATE``). New batches are appended behind the backlog, so the
backlog drains in order while new data keeps arriving.

Topics: the gateway's own batches go to ``ce/v1/<gateway>/up/readings``; a node's batch,
relayed unchanged, goes to ``ce/v1/<gateway>/up/relay`` (the broker ACL lets a client
write only under its own id; the batch names and is signed by its node). The fleet
accepts it only if the node is registered with this gateway as its ``gateway_id``
(otherwise ``not_relay_gateway``, counted against the gateway): register each node of
the config's ``[[nodes]]`` with this gateway.

Fleet commands: with ``on_command`` set (the gateway trusts a fleet key), every connection
subscribes to ``ce/v1/<gateway>/down/cmd`` (QoS 1, a clean session each time, as the
fleet's publisher expects: its PUBACK then tells whether the gateway was there) before the
backlog drains, and each command's answer goes out on ``ce/v1/<gateway>/up/result``. An
answer lost with the link is not re-sent from here: the fleet sends the command again
and the responder answers it again.

Key rotation: ``publish_up`` sends the CSR (``up/csr``) on the live connection;
``use_identity(cert_file, key_file)`` rebuilds the TLS context and ends the live session
so the next one presents the new certificate (at once, without the backoff). A handler
that must not switch before its answer is out sets ``after_answer``: it runs once that
answer's publish has been tried (PUBACK, or the link broke: the switch must not wait for a
link that may never come back with the old certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiomqtt

from cityedge_core import topics
from cityedge_host.backoff import Backoff
from cityedge_host.mqtt_client import FailFastClient

from . import limits
from .config import BrokerConfig
from .store import Store, Stored

log = logging.getLogger(__name__)

DELETE_EVERY_S = 0.05  # seconds: acknowledged rows are deleted in groups this often
LINK_CHECK_S = 0.2  # seconds: how often the drain checks that the socket is still up


def paho_client(client: aiomqtt.Client) -> Any:
    """The paho client inside aiomqtt: the one seam for what aiomqtt does not expose
    (connection state, manual acknowledgements)."""
    return client._client


def tls_context(cfg: BrokerConfig) -> ssl.SSLContext:
    """TLS 1.2+ to the broker, verified against ``ca_file``, presenting our certificate."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    return ctx


@dataclass
class ForwarderStats:
    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    published: int = 0  # PUBACKs received
    commands: int = 0  # messages received on down/cmd
    identity_switches: int = 0  # reconnects to present a new certificate
    last_error: str = ""


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled task and take how it ended (a broken link, what ended it
    first, is expected; any other error is logged), so that nothing is left for the
    collector to report as never retrieved. A cancel of the caller still cancels it."""
    await asyncio.wait({task})
    if not task.cancelled():
        error = task.exception()
        if error is not None and not isinstance(error, aiomqtt.MqttError):
            log.error("command listener failed", exc_info=error)


class Forwarder:
    def __init__(self, cfg: BrokerConfig, device: str, store: Store) -> None:
        self.cfg = cfg
        self.device = device
        self.store = store
        self.stats = ForwarderStats()
        self.wakeup = asyncio.Event()  # set when new batches were committed
        self.client: aiomqtt.Client | None = None  # while connected
        self._ctx = tls_context(cfg)
        self._switch = asyncio.Event()  # set: leave the session, reconnect with _ctx
        # set by the service when it obeys fleet commands: takes a command's bytes, returns
        # the signed answer to publish (or None)
        self.on_command: Callable[[bytes], Awaitable[bytes | None]] | None = None
        # set by a command handler: runs once, after its answer's publish was tried
        self.after_answer: Callable[[], None] | None = None
        # set by the update's trial (``ota_health``): told of every batch the broker acked
        self.on_acked: Callable[[Stored], None] | None = None

    def use_identity(self, cert_file: Path, key_file: Path) -> None:
        """Present ``cert_file``/``key_file`` from the next connection on, and end the
        live one now (files read here: a bad pair raises before anything changes)."""
        cfg = replace(self.cfg, cert_file=cert_file, key_file=key_file)
        self._ctx = tls_context(cfg)
        self.cfg = cfg
        self._switch.set()

    def topic_for(self, row: Stored) -> str:
        kind = topics.READINGS if row.device == self.device else topics.RELAY
        return topics.up(self.device, kind)

    def notify(self) -> None:
        self.wakeup.set()

    async def publish_status(self, data: bytes) -> bool:
        """Publish a signed status now if connected (status is not buffered: it is current
        state, and the next one supersedes it)."""
        return await self.publish_up(topics.STATUS, data)

    async def publish_up(self, kind: str, data: bytes) -> bool:
        """Publish ``data`` on ``ce/v1/<gateway>/up/<kind>`` now (QoS 1) if connected:
        True once the broker acknowledged it."""
        client = self.client
        if client is None:
            return False
        try:
            await client.publish(topics.up(self.device, kind), data, qos=1)
        except aiomqtt.MqttError as e:
            log.info("%s not sent: %s", kind, e)
            return False
        return True

    async def run(self) -> None:
        backoff = Backoff(limits.MQTT_BACKOFF_MIN_S, limits.MQTT_BACKOFF_MAX_S)
        while True:
            self._switch.clear()  # the context read below is the newest
            try:
                client = FailFastClient(
                    self.cfg.host,
                    self.cfg.port,
                    identifier=self.device,
                    tls_context=self._ctx,
                    keepalive=self.cfg.keepalive_s,
                    max_inflight_messages=self.cfg.inflight,
                    timeout=10,
                )
                # many publishes in flight is the design, not a leak: silence that warning
                client.pending_calls_threshold = self.cfg.inflight + 1
                async with client:
                    self.stats.connected = True
                    self.stats.connects += 1
                    backoff.reset()
                    log.info("connected to %s:%d", self.cfg.host, self.cfg.port)
                    self.client = client
                    listener = None
                    if self.on_command is not None:
                        await client.subscribe(topics.down(self.device, topics.CMD), qos=1)
                        listener = asyncio.create_task(self._commands(client, self.on_command))
                    drain = asyncio.create_task(self._drain(client))
                    switch = asyncio.create_task(self._switch.wait())
                    try:
                        await asyncio.wait({drain, switch}, return_when=asyncio.FIRST_COMPLETED)
                        if drain.done():
                            drain.result()  # the link broke: raises
                    finally:
                        for task in (drain, switch, listener):
                            if task is not None:
                                task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await drain
                        if listener is not None:  # its end taken, not left to the collector
                            await _ended(listener)
                    log.info("new identity: leaving the session to reconnect with it")
            except aiomqtt.MqttError as e:
                self.stats.connect_failures += 1
                self.stats.last_error = str(e)
                log.warning("broker link down: %s; retrying", e)
            finally:
                self.stats.connected = False
                self.client = None
            if self._switch.is_set():
                self.stats.identity_switches += 1
                continue  # at once: the new certificate is ready
            await asyncio.sleep(backoff.next())

    async def _commands(self, client: aiomqtt.Client,
                        on_command: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        """Answer each command on this connection, in the order they arrive."""
        wanted = topics.down(self.device, topics.CMD)
        results = topics.up(self.device, topics.RESULT)
        async for msg in client.messages:
            if str(msg.topic) != wanted or not isinstance(msg.payload, bytes | bytearray):
                continue
            self.stats.commands += 1
            answer = await on_command(bytes(msg.payload))
            try:
                if answer is not None:
                    await client.publish(results, answer, qos=1)
            except aiomqtt.MqttError as e:  # the link broke: the fleet will send it again
                log.info("command answer not sent: %s", e)
                return
            finally:
                hook, self.after_answer = self.after_answer, None
                if hook is not None:
                    hook()

    async def _drain(self, client: aiomqtt.Client) -> None:
        sem = asyncio.Semaphore(self.cfg.inflight)
        acked: list[int] = []
        failed: list[BaseException] = []
        tasks: set[asyncio.Task[None]] = set()
        cursor = 0
        last_delete = time.monotonic()

        async def publish(row: Stored) -> None:
            try:
                await client.publish(self.topic_for(row), row.data, qos=1)
                acked.append(row.id)
                self.stats.published += 1
                if self.on_acked is not None:
                    self.on_acked(row)
            except aiomqtt.MqttError as e:
                failed.append(e)
            finally:
                sem.release()

        paho = paho_client(client)

        async def watchdog() -> None:
            # aiomqtt leaves a publish waiting for its PUBACK until its timeout even when
            # the socket is gone; notice the loss at once and let the reconnect begin.
            while paho.is_connected():
                await asyncio.sleep(LINK_CHECK_S)
            failed.append(aiomqtt.MqttError("connection lost"))
            for task in list(tasks):
                task.cancel()
            for _ in range(self.cfg.inflight):
                sem.release()  # unblock the loop below even for tasks that never started

        dog = asyncio.create_task(watchdog())
        try:
            while not failed:
                if acked and (len(acked) >= 256 or time.monotonic() - last_delete > DELETE_EVERY_S):
                    self.store.delete(acked[:])
                    acked.clear()
                    last_delete = time.monotonic()
                rows = self.store.oldest(self.cfg.inflight, after_id=cursor)
                if not rows:
                    self.wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), DELETE_EVERY_S)
                    continue
                for row in rows:
                    await sem.acquire()
                    if failed:
                        sem.release()
                        break
                    task = asyncio.create_task(publish(row))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    cursor = row.id
            raise failed[0]
        finally:
            dog.cancel()
            for task in list(tasks):
                task.cancel()
            if acked:
                self.store.delete(acked[:])
