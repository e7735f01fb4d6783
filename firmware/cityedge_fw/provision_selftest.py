"""Provisioning's self-test: the installed identity proven on the agent's own MQTT link.

The ``self_test`` step (``provision.Provisioner.self_test``) calls ``run(prov, timeout_s)``.
It connects as the agent will once the device is locked: the same TLS context
(``mqtt_async.tls_context``: the installed certificate, key and CA), the same ``Link``
(TCP, TLS, CONNECT, the QoS 1 publish path and its PUBACK), the same client, but once and
without the reconnect loop (``Link.once``), all within the step's timeout. No second MQTT
loop lives here: one MQTT stack on the device, one on its heap.

========  ============================================  ===================================
stage     what                                          a failure here means
========  ============================================  ===================================
connect   plain TCP connect to the broker, blocking,    nothing listens there, no route
          at most ``_PROBE_TIMEOUT_S`` (MicroPython's   (DNS, network)
          non-blocking connect would only fail later,
          inside the TLS handshake)
tls       the link: TLS with the installed identity,    the broker does not trust the
          MQTT CONNECT, its CONNACK                     certificate (CA, revoked), the
                                                        device does not trust the broker,
                                                        or CONNACK refused
publish   SUBSCRIBE to the device's command topic, as   the broker's rules do not take
          the agent does after every CONNACK, granted;  this device (not granted), or the
          one signed batch QoS 1 on ``up/readings``,    connection broke before the
          its PUBACK                                    acknowledgement
done      both acknowledged: the step sets ``tested``
========  ============================================  ===================================

Why the SUBSCRIBE: MQTT 3.1.1 has no negative PUBACK. Mosquitto acknowledges a QoS 1
publish its ACL refuses and drops it (Mosquitto 2.0, checked), so a PUBACK alone does not
show the broker takes the device's readings. A refused subscription does show (SUBACK
0x80): a device the broker's rules do not cover fails at ``publish``. A rule that lets a
device subscribe but not publish stays invisible to any 3.1.1 client; the fleet's ingest
sees the batch or not. A command that reaches the device during the test is acknowledged
by the client and not acted on (the agent is not running yet; its clean session would not
have kept it either).

The batch is number ``seq + 1`` of the device's own chain (``state.cbor``, which the agent
continues): one SenML record ``selftest`` = 1, signed with the device key before the
connection (the signature's temporary objects are gone before the TLS handshake, the
heap's peak), and its seq and head stored right before it is published, as the agent does,
so the fleet's ingest sees an unbroken chain from batch 1. A test that fails before
``publish`` stores nothing and uses no number.

Memory: see ``provision``'s module doc (measured at the TLS peak with the link up).
"""

import asyncio  # MicroPython 1.25+ (ROMFS): no ``uasyncio`` fallback, one name less
import gc
import sys

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core import cose
from cityedge_core.errors import PeerError

from . import mqtt, store, unload
from .mqtt_async import Link, monotonic_ms, tls_context

_PROBE_TIMEOUT_S = const(5)  # seconds: the plain TCP connect to the broker
_KEEPALIVE_S = const(30)  # seconds: MQTT keep-alive of the test's session
_REFUSED = const(0x80)  # SUBACK return code: subscription refused (MQTT 3.1.1 §3.9.3)

CONNECT = "connect"
TLS = "tls"
PUBLISH = "publish"
DONE = "done"

# modules not needed from the TLS handshake on (the heap's peak): the boot path's, the
# CSR code, and the two this module uses before it (batch signing, the topic names);
# ``unload`` drops them from ``sys.modules`` and from their package
_UNNEEDED = ("cityedge_fw.main", "cityedge_fw.keys", "cityedge_fw.enroll_http",
             "cityedge_core.csr", "cityedge_core.batch", "cityedge_core.topics")


def run(prov, timeout_s, release=None):
    """The self-test of ``prov``'s installed identity, at most ``timeout_s`` seconds:
    ``(ok, stage, message, seq)``; ``stage`` is ``done`` when it passed, else where it
    failed (see the module doc); ``seq`` the batch's number once it was published.
    ``release()``, when given, frees the heap block kept for the TLS context: it is
    called right before the context is made (``provision_main.SelfTestHook``)."""
    test = SelfTest(prov, timeout_s * 1000, release)
    try:
        asyncio.run(test.run())
    except Exception as e:  # the stage says where it failed
        text = "%s: %s" % (type(e).__name__, e)
        if test.late():
            text = "no answer within %d s (%s)" % (timeout_s, text)
        return False, test.stage, text, test.seq
    finally:
        # A fresh event loop, so that nothing of this connection outlives the run: the
        # old loop's poller still refers to the closed TLS socket (MicroPython's poll keeps
        # a removed entry's value in its map), and through it to the TLS context, whose
        # 3 KiB block a next run needs (measured: 3.7 KiB freed); the link's cancelled
        # reader goes with the old task queue.
        test.link = None
        asyncio.new_event_loop()
    return True, DONE, "published batch %d, acknowledged" % test.seq, test.seq


class SelfTest:
    """One run: ``stage`` (where it is), ``seq`` (the published batch, 0 before)."""

    def __init__(self, prov, timeout_ms, release=None):
        self.prov = prov
        self.release = release
        self.stage = CONNECT
        self.seq = 0
        self.deadline = monotonic_ms() + timeout_ms
        self.link = None
        self._cfg = None
        self._topics = None  # (readings, command): where the batch goes, what is subscribed
        self._state = None
        self._batch = None  # (signed, seq, head), signed before the connection
        self._pid = None  # the batch's packet id
        self._subscribed = False
        self._acked = False

    def late(self):
        return monotonic_ms() >= self.deadline

    async def run(self):
        cfg = self._cfg = self.prov.config()
        broker = cfg["broker"]
        self._topics = _topic_names(cfg["device"])
        self.stage = CONNECT
        _tcp_probe(broker["host"], broker["port"])
        self._sign()
        self.stage = TLS
        _free_unneeded()
        tls = cfg["tls"]
        ders = (_read(tls["cert"]), _read(tls["key"]), _read(tls["ca"]))
        if self.release is not None:  # the context's block: free now, nothing else in it
            self.release()
            gc.collect()
        ctx = tls_context(ders[0], ders[1], ders[2])
        ders = None
        client = mqtt.Client(cfg["device"], _KEEPALIVE_S, True, None)
        self.link = Link(client, broker["host"], broker["port"], ctx,
                         broker.get("server_hostname") or broker["host"],
                         self._on_event, self._on_connect)
        await self.link.once(self.deadline - monotonic_ms())

    def _sign(self):
        """The batch (not yet stored): ``(signed, seq, head)``."""
        from cityedge_core import batch as batchmod

        prov, device = self.prov, self._cfg["device"]
        state = self._state = store.State(self._cfg["store"]["state"])
        key = prov.key()
        writer = batchmod.BatchWriter(device, key,
                                      cose.kid_for_public_key(key.public_key().to_sec1()),
                                      state.get("seq", 0),
                                      state.get("head", batchmod.ZERO_HASH))
        recs = batchmod.RecordBuffer()
        now = prov.clock()
        rec = {-2: device + ":", 0: "selftest", 2: 1}
        if now is not None:
            rec[-3] = now
        recs.add(rec)
        signed = writer.sign_buffer(recs, state.get("boot", 0),
                                    batchmod.TIME_UNIX if now is not None
                                    else batchmod.TIME_SINCE_BOOT)
        self._batch = (signed, writer.seq, writer.head)

    async def _on_connect(self):
        self.stage = PUBLISH
        readings, command = self._topics
        await self.link.subscribe([(command, 1)])
        signed, seq, head = self._batch
        self._state.set(seq=seq, head=head)  # as the agent does: stored before sending
        self.seq = seq
        self._pid = await self.link.publish(readings, signed, 1)

    async def _on_event(self, event):
        if event[0] == mqtt.SUBACK:
            if _REFUSED in event[2]:
                raise PeerError("the broker refused %s: its rules do not take this device"
                                % self._topics[1])
            self._subscribed = True
        elif event[0] == mqtt.PUBACK and event[1] == self._pid:
            self._acked = True
        if self._subscribed and self._acked:
            _report_heap("with the link up")
            self.link.stop()


def _topic_names(device):
    """``(readings, command)``: where the batch goes, what is subscribed to."""
    from cityedge_core import topics  # for the two names only: unloaded before TLS

    return topics.up(device, topics.READINGS), topics.down(device, topics.CMD)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _free_unneeded():
    """Drop what the rest of the self-test does not use: the TLS handshake is the heap's
    peak."""
    unload(*_UNNEEDED)
    _report_heap("before TLS")


def _report_heap(when):
    gc.collect()
    if hasattr(gc, "mem_free"):  # MicroPython
        print("self-test: %d bytes of heap in use, %d free %s"
              % (gc.mem_alloc(), gc.mem_free(), when), file=sys.stderr)


def _tcp_probe(host, port):
    """Connect and close (blocking, bounded): tells "unreachable" from "refused us"."""
    import socket

    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    s = socket.socket(ai[0], ai[1])
    try:
        s.settimeout(_PROBE_TIMEOUT_S)
        s.connect(ai[-1])
    finally:
        s.close()
