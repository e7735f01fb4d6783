"""The asyncio side of the MQTT client: TLS socket, reconnect, keep-alive.

``Link`` owns one ``mqtt.Client`` and keeps it connected: ``run()`` connects with
``asyncio.open_connection`` (TLS with the device's client certificate), reads and feeds
the state machine, ticks the keep-alive once a second, and after any failure waits a
jittered, doubling backoff (``BACKOFF_MIN_MS`` .. ``BACKOFF_MAX_MS``) and connects again.
A broker that is down at boot is normal: ``run()`` just keeps trying. QoS 1 messages not
yet acknowledged are re-sent by the state machine after the next CONNACK.

Events go to ``on_event(event)``; ``on_connect()`` is awaited after every CONNACK (the
agent subscribes there, since a clean session forgets subscriptions).

Runs on MicroPython (``ssl.SSLContext`` with DER certificates) and CPython (tests).
"""

import os

try:
    import asyncio
except ImportError:  # pragma: no cover - old MicroPython
    import uasyncio as asyncio  # type: ignore[no-redef]

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core.errors import PeerError, TransportError

from . import mqtt

BACKOFF_MIN_MS = const(500)  # ms: first retry delay after a failed connection
BACKOFF_MAX_MS = const(60000)  # ms: longest retry delay
CONNECT_TIMEOUT_MS = const(15000)  # ms: TCP + TLS + CONNACK must finish within this
TICK_MS = const(1000)  # ms: keep-alive check interval
READ_CHUNK = const(1024)  # bytes: one socket read


try:
    from time import ticks_diff, ticks_ms  # type: ignore[attr-defined]
except ImportError:  # CPython
    import time as _time

    def ticks_ms():
        return int(_time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b


class MonotonicMs:
    """A millisecond clock that does not wrap (``ticks_ms`` wraps after days)."""

    def __init__(self):
        self._last = ticks_ms()
        self._ms = 0

    def __call__(self):
        now = ticks_ms()
        self._ms += ticks_diff(now, self._last)
        self._last = now
        return self._ms


async def sleep_ms(ms):
    if hasattr(asyncio, "sleep_ms"):
        await asyncio.sleep_ms(ms)
    else:
        await asyncio.sleep(ms / 1000)


async def wait_event_ms(event, ms):
    """Wait for ``event`` at most ``ms`` milliseconds (no error on timeout)."""
    try:
        if hasattr(asyncio, "wait_for_ms"):
            await asyncio.wait_for_ms(event.wait(), ms)
        else:
            await asyncio.wait_for(event.wait(), ms / 1000)
    except asyncio.TimeoutError:
        pass


def tls_context(cert_der, key_der, ca_der):
    """A TLS client context with our certificate and the city CA (MicroPython ``ssl``)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert_der, key_der)
    ctx.load_verify_locations(cadata=ca_der)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def backoff_ms(attempt):
    """Delay before retry ``attempt`` (0-based): doubling, capped, 50-100 % random jitter."""
    top = BACKOFF_MIN_MS << min(attempt, 7)
    if top > BACKOFF_MAX_MS:
        top = BACKOFF_MAX_MS
    r = os.urandom(1)[0]
    return top // 2 + (top // 2) * r // 255


class Link:
    """Keeps one MQTT session up over TLS. ``run()`` is the task; see the module doc."""

    def __init__(self, client, host, port, ssl_ctx=None, server_hostname=None,
                 on_event=None, on_connect=None, clock=None):
        self.client = client
        self.host = host
        self.port = port
        self.ssl_ctx = ssl_ctx
        self.server_hostname = server_hostname
        self.on_event = on_event
        self.on_connect = on_connect
        self.clock = clock or MonotonicMs()
        self.connected = asyncio.Event()
        self.connects = 0  # successful CONNACKs
        self.failures = 0  # failed or lost connections
        self.last_error = None
        self._writer = None
        self._lock = asyncio.Lock()
        self._stop = False
        self._read_error = None

    async def run(self):
        attempt = 0
        while not self._stop:
            try:
                await self._session()
                attempt = 0
            except (OSError, TransportError, PeerError, asyncio.TimeoutError) as e:
                self.failures += 1
                self.last_error = "mqtt: %s" % (e,)
            finally:
                await self._close()
            if self._stop:
                break
            await sleep_ms(backoff_ms(attempt))
            attempt += 1

    def stop(self):
        self._stop = True

    async def publish(self, topic, payload, qos=0, retain=False):
        """Publish now (raises ``TransportError`` when down, ``InflightFull`` when full)."""
        pid = self.client.publish(topic, payload, qos, retain, self.clock())
        await self.flush()
        return pid

    async def subscribe(self, filters):
        pid = self.client.subscribe(filters, self.clock())
        await self.flush()
        return pid

    async def flush(self):
        data = self.client.data_to_send()
        if not data or self._writer is None:
            return
        async with self._lock:
            self._writer.write(data)
            await self._writer.drain()

    async def _session(self):
        kw = {}
        if self.ssl_ctx is not None:
            kw["ssl"] = self.ssl_ctx
            if self.server_hostname:
                kw["server_hostname"] = self.server_hostname
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, **kw), CONNECT_TIMEOUT_MS / 1000)
        self._writer = writer
        self.client.connect(self.clock())
        await self.flush()
        deadline = self.clock() + CONNECT_TIMEOUT_MS
        self._read_error = None
        task = asyncio.create_task(self._read_loop(reader))
        try:
            # Keep-alive and CONNACK deadline here; the read loop ends on its own errors.
            while not task.done():
                await sleep_ms(TICK_MS)
                if self._read_error is not None or task.done():
                    break
                now = self.clock()
                if self.client.state == mqtt.CONNECTING and now > deadline:
                    raise TransportError("mqtt: no CONNACK within %d ms" % CONNECT_TIMEOUT_MS)
                self.client.tick(now)
                await self.flush()
            if self._read_error is not None:
                raise self._read_error
        finally:
            if not task.done():
                task.cancel()

    async def _read_loop(self, reader):
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    raise TransportError("mqtt: the broker closed the connection")
                events = self.client.feed(data, self.clock())
                await self.flush()  # PUBACKs for inbound QoS 1, re-sent in-flight messages
                for event in events:
                    if event[0] == mqtt.CONNACK:
                        self.connects += 1
                        self.connected.set()
                        if self.on_connect is not None:
                            await self.on_connect()
                    elif self.on_event is not None:
                        await self.on_event(event)
        except Exception as e:  # handed to _session, which reconnects
            self._read_error = e

    async def _close(self):
        self.connected.clear()
        if self.client.state != mqtt.DISCONNECTED:
            self.client.connection_lost()
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
                await writer.wait_closed()
            except (OSError, AttributeError):
                pass
