"""The asyncio side of the MQTT client: TLS socket, reconnect, keep-alive.

``Link`` owns one ``mqtt.Client`` and keeps it connected: ``run()`` connects (``open_socket``:
TLS with the device's client certificate), reads and feeds the state machine, ticks the
keep-alive once a second, and after any failure waits a jittered, doubling backoff
(``backoff.delay_ms``, ``_BACKOFF_MIN_MS`` .. ``_BACKOFF_MAX_MS``) and connects again.
A broker that is down at boot is normal: ``run()`` just keeps trying. QoS 1 messages not
yet acknowledged are re-sent by the state machine after the next CONNACK.

Events go to ``on_event(event)``; ``on_connect()`` is awaited after every CONNACK (the
agent subscribes there, since a clean session forgets subscriptions).

``once(timeout_ms)`` is the same connection without the reconnect loop, for a caller with
one job (provisioning's self-test, ``provision_selftest``): it returns when ``on_connect``
or ``on_event`` calls ``stop()``, and raises what ended the connection otherwise (or a
``TransportError`` when the time is up).

Connections run on MicroPython (its ``tls`` module with DER certificates, its asyncio
I/O queue); the rest of the module also imports on CPython (tests).
"""

import asyncio  # MicroPython 1.25+ (ROMFS): no ``uasyncio`` fallback, one name less
import gc

try:
    from asyncio import core as _aio  # MicroPython's scheduler, with its I/O wait queue
except ImportError:  # CPython: no Link connections there
    _aio = None

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core.errors import PeerError, TransportError

from . import mqtt, unload

# Private (``_X = const()``) so the compiler folds them: no heap on the device.
_BACKOFF_MIN_MS = const(500)  # ms: first retry delay after a failed connection
_BACKOFF_MAX_MS = const(60000)  # ms: longest retry delay
_CONNECT_TIMEOUT_MS = const(15000)  # ms: TCP + TLS + CONNACK must finish within this
_TICK_MS = const(1000)  # ms: keep-alive check interval
_ONCE_TICK_MS = const(100)  # ms: the same check in ``once``: its caller waits on ``stop()``
# bytes: one socket read. Broker packets to a device are small (PUBACK, PINGRESP, a
# command); a 1 KiB read buffer cost a 1 KiB allocation per read on a 64 KiB heap.
_READ_CHUNK = const(256)


try:
    from time import ticks_diff, ticks_ms  # type: ignore[attr-defined]
except ImportError:  # CPython
    from time import monotonic

    def ticks_ms():
        return int(monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b


_MONO = [ticks_ms(), 0]  # ticks at the last call, milliseconds counted until then


def monotonic_ms():
    """Milliseconds on a clock that does not wrap (``ticks_ms`` wraps after days); call it
    at least once per wrap period (the link's keep-alive tick does, every second). A
    function, not a class: a class costs the device ~300 bytes of heap."""
    now = ticks_ms()
    _MONO[1] += ticks_diff(now, _MONO[0])
    _MONO[0] = now
    return _MONO[1]


def sleep_ms(ms):
    """An awaitable sleep of ``ms`` milliseconds. MicroPython's ``asyncio.sleep_ms``
    reuses one object for every sleep, so a sleeping task keeps no frame for it on the
    heap (a wrapping ``async def`` would keep one per task)."""
    if hasattr(asyncio, "sleep_ms"):
        return asyncio.sleep_ms(ms)
    return asyncio.sleep(ms / 1000)  # CPython


def tls_context(cert, key, ca):
    """A TLS client context with our certificate and the city CA.

    MicroPython's native ``tls`` module (1.23+): its context does all ``asyncio`` needs,
    and the ``ssl`` module around it would cost another 1 KB of heap."""
    import tls  # type: ignore[import-not-found]

    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)  # the native method takes cadata positionally
    ctx.verify_mode = tls.CERT_REQUIRED
    return ctx


# One TCP (TLS) connection on MicroPython's asyncio: ``open_socket``, ``send`` (the reads
# are ``Link._connection``'s own loop).
# ``asyncio.open_connection`` and its ``Stream`` do the same, but their module keeps
# 1.9 KB on the heap (a server, line reading, legacy aliases) that the agent never uses.
# The socket is non-blocking: ``read``/``write`` return None when they would block, and
# the task then waits in asyncio's I/O queue (``asyncio.core._io_queue``, the hook
# ``asyncio.stream`` itself uses) until the socket is ready. These are generators, which
# MicroPython awaits like coroutines; plain functions, not a class (~400 bytes less heap).


def open_socket(host, port, ssl_ctx=None, server_hostname=None):
    """Awaitable: a non-blocking socket to ``host:port``, TLS when ``ssl_ctx`` is given
    (the handshake then runs within the first sends and reads)."""
    import socket
    from errno import EINPROGRESS

    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(ai[0], ai[1], ai[2])
    sock.setblocking(False)
    try:
        sock.connect(ai[-1])
    except OSError as e:
        if e.errno != EINPROGRESS:
            sock.close()
            raise
    if ssl_ctx is not None:
        sock = ssl_ctx.wrap_socket(sock, server_hostname=server_hostname or host,
                                   do_handshake_on_connect=False)
        sock.setblocking(False)
    yield _aio._io_queue.queue_write(sock)  # connected (or failed: the next I/O says)
    return sock


def send(sock, data):
    """Awaitable: all of ``data`` written. It writes first and waits only when the socket
    would block: a packet that fits the socket's buffer is written before any other task
    runs (a status' chunks are then never alive beside a batch's signature: ``Agent.run``)."""
    mv = memoryview(data)
    off = 0
    while off < len(mv):
        n = sock.write(mv[off:])
        if n:
            off += n
        else:  # None: it would block
            yield _aio._io_queue.queue_write(sock)


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
        self.clock = clock or monotonic_ms
        self.connects = 0  # successful CONNACKs
        self.failures = 0  # failed or lost connections
        self.last_error = None
        self._sock = None  # the connection's socket while there is one
        self._draining = False
        self._stop = False
        self._read_error = None

    def run(self):
        """The task: connect, and after any failure back off and connect again, until
        ``stop()``. Returns the session's coroutine itself (``_session``), with no frame of
        its own around it on the heap while the link runs."""
        return self._session(None, _TICK_MS, True)

    def stop(self):
        """End ``run()`` or ``once()``: the session closes at its next tick."""
        self._stop = True

    async def once(self, timeout_ms):
        """One connection and no reconnect (see the module doc): returns after ``stop()``,
        raises what ended the connection first, or ``TransportError`` once ``timeout_ms``
        passed; the socket is closed either way."""
        self._stop = False
        await self._session(self.clock() + timeout_ms, _ONCE_TICK_MS, False)

    async def publish(self, topic, payload, qos=0, retain=False):
        """Publish now (raises ``TransportError`` when down, ``LocalError`` when the
        in-flight window is full)."""
        pid = self.client.publish(topic, payload, qos, retain, self.clock())
        await self.flush()
        return pid

    async def subscribe(self, filters):
        pid = self.client.subscribe(filters, self.clock())
        await self.flush()
        return pid

    async def flush(self):
        """Send what the client has queued. One task drains at a time (a stream allows
        one writer waiting on it); bytes queued meanwhile stay in the client and that
        task sends them too before it returns, so nothing waits for the next flush."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._sock is not None:
                chunks = self.client.chunks_to_send()
                if not chunks:
                    break
                sock = self._sock
                for chunk in chunks:  # a PUBLISH's header, then its payload: no joined copy
                    await send(sock, chunk)
                chunks = chunk = None
        finally:
            self._draining = False

    def sending(self):
        """True until everything queued so far is written to the socket (or dropped
        with the connection): a payload the caller means to reuse is free after that."""
        return self._draining or self.client.queued

    async def _session(self, until, tick_ms, retry):
        """Connections: ``_connection`` opens one and reads; this task ticks the
        keep-alive every ``tick_ms`` and enforces the connect deadline (TCP + TLS +
        CONNACK) and ``until`` (``once``), without a ``wait_for`` (its module and task
        would stay on the heap). Returns after ``stop()``; a failure ends it (``once``)
        or, with ``retry`` (``run``), is counted and followed by a jittered, doubling
        back-off and the next connection."""
        attempt = 0
        while True:
            deadline = self.clock() + _CONNECT_TIMEOUT_MS
            self._read_error = None
            task = asyncio.create_task(self._connection())
            try:
                while not task.done():
                    await sleep_ms(tick_ms)
                    if self._stop or self._read_error is not None or task.done():
                        break
                    now = self.clock()
                    if self.client.state != mqtt.CONNECTED and now > deadline:
                        raise TransportError("mqtt: not connected within %d ms"
                                             % _CONNECT_TIMEOUT_MS)
                    if until is not None and now > until:
                        raise TransportError("mqtt: not done in time")
                    self.client.tick(now)
                    await self.flush()
                if self._read_error is not None and not self._stop:
                    raise self._read_error
                attempt = 0
            except (OSError, TransportError, PeerError, MemoryError) as e:
                if not retry:
                    raise
                # MemoryError: a TLS handshake found no room in a fragmented heap; after
                # the back-off the heap has changed (what it says shows in ``last_error``)
                self.failures += 1
                self.last_error = "mqtt: %s" % (e,)
            finally:
                if not task.done():
                    task.cancel()
                task = None
                self._close()
            if self._stop or not retry:
                return
            from .backoff import delay_ms  # loaded for the moment: 0.5 KB of heap

            wait = delay_ms(attempt, _BACKOFF_MIN_MS, _BACKOFF_MAX_MS)
            delay_ms = None
            unload("cityedge_fw.backoff")
            await sleep_ms(wait)
            attempt += 1

    async def _connection(self):
        """Open the connection, send CONNECT, then read and feed the client until an
        error, which is handed to ``_session`` (it reconnects). The reads wait in
        asyncio's I/O queue right here (``read``'s loop inline: no generator frame on the
        heap while the link is idle, which is most of the time)."""
        try:
            gc.collect()  # the TLS handshake needs ~4 KB at once: start from a clean heap
            sock = self._sock = await open_socket(self.host, self.port, self.ssl_ctx,
                                                  self.server_hostname)
            self.client.connect(self.clock())
            await self.flush()
            while True:
                yield _aio._io_queue.queue_read(sock)  # MicroPython: a coroutine may yield
                data = sock.read(_READ_CHUNK)
                if data is None:
                    continue
                if not data:
                    raise TransportError("mqtt: the broker closed the connection")
                events = self.client.feed(data, self.clock())
                data = None
                await self.flush()  # PUBACKs for inbound QoS 1, re-sent in-flight messages
                for event in events:
                    if event[0] == mqtt.CONNACK:
                        self.connects += 1
                        if self.on_connect is not None:
                            await self.on_connect()
                    elif self.on_event is not None:
                        await self.on_event(event)
                events = None
        except Exception as e:  # handed to _session, which reconnects
            self._read_error = e

    def _close(self):
        if self.client.state != mqtt.DISCONNECTED:
            self.client.connection_lost()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
