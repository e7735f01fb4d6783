"""MQTT 3.1.1 client as a sans-IO state machine (OASIS MQTT 3.1.1, 2014).

The client is fed the bytes the broker sent (``feed``) and returns events; whatever it has
to send accumulates until ``chunks_to_send`` takes it. Sockets, TLS and asyncio live in
``mqtt_async``; this module does no I/O, reads no clock (``tick`` is given the time) and
runs unchanged on MicroPython and CPython.

What it does:

- CONNECT / CONNACK (§3.1, §3.2), clean or persistent session, username, keep-alive.
- PUBLISH QoS 0 and 1 (§3.3, §4.3.2): QoS 1 messages stay in the in-flight window (at
  most ``max_inflight``, oldest first) until their PUBACK; after a reconnect they are sent
  again, in the same order, with the DUP flag (§4.4). A client made with
  ``keep_inflight=False`` forgets them when the connection is lost instead (their
  payloads leave RAM as soon as they are sent; the caller, who keeps them elsewhere,
  publishes them again). A kept payload is copied if the caller could change it
  (``bytearray``, ``memoryview``): a re-send must carry the bytes first published. An
  inbound QoS 1 PUBLISH is acknowledged at once. Inbound QoS 2 is refused: we never
  subscribe above QoS 1.
- SUBSCRIBE / SUBACK (§3.8, §3.9), PINGREQ / PINGRESP (§3.12, §3.13); no DISCONNECT: the
  device only ever closes the socket. What only tests use (a whole PUBLISH in one piece,
  the queue joined) is in ``tests/support/mqtt_codec.py``: every function here costs the
  board heap.

Errors: bytes from the broker that break the protocol raise ``MalformedError`` (the peer is
at fault; drop the connection); a PINGRESP that does not come and a refused CONNACK raise
``TransportError``; a full in-flight window raises ``LocalError`` (wait for PUBACKs;
``can_publish()`` says when there is room).

Sizes are bounded: an inbound packet larger than ``max_packet`` bytes is refused before
it is buffered (``LimitError``). All MQTT limits are the constants below.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core.errors import LimitError, LocalError, MalformedError, TransportError, text

# --- limits (all MQTT sizes, counts and times in one place) ---------------------------
# A public ``X = const()`` is a module attribute on the device heap; names no other module
# uses are private ``_X``, which the compiler folds away.
_MAX_PACKET_BYTES = const(20480)  # bytes: largest inbound packet (a 16 KiB command + topic)
_MAX_INFLIGHT = const(4)  # QoS 1 publishes awaiting PUBACK
_MAX_TOPIC_BYTES = const(256)  # bytes: UTF-8 topic name or filter
_MAX_CLIENT_ID_BYTES = const(128)  # bytes: client id (a device URN)
_KEEPALIVE_S = const(60)  # seconds: default keep-alive interval (§3.1.2.10)
_REMAINING_LENGTH_MAX = const(268435455)  # §2.2.3: four-byte variable length integer

# --- packet types (§2.2.1) -------------------------------------------------------------
_CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
_PUBREC = const(5)
_SUBSCRIBE = const(8)
SUBACK = const(9)
_PINGREQ = const(12)
PINGRESP = const(13)
_DISCONNECT = const(14)

# --- client states ---------------------------------------------------------------------
DISCONNECTED = const(0)
_CONNECTING = const(1)
CONNECTED = const(2)

# Every message this module raises: one string constant, the message cut out and
# formatted only when raised (``text``). Each string constant over 10 characters was an
# object of its own on the device heap for as long as the module is loaded (27 of them,
# 0.9 KiB, with a tuple of the CONNACK texts); the last six are the CONNACK refusals
# (§3.2.2.3: codes 1..5, then "unknown" for any other), by code.
_TEXTS = const(
    "mqtt: remaining length %d out of range|mqtt: string contains NUL|"
    "mqtt: string of %d bytes, limit %d|mqtt: keep-alive %d s out of range|"
    "mqtt: QoS %r not supported|mqtt: bad topic name %r|"
    "mqtt: SUBSCRIBE needs at least one filter|"
    "mqtt: remaining length longer than four bytes|"
    "mqtt: packet of %d bytes, limit %d|mqtt: string runs past the packet|"
    "mqtt: string is not UTF-8|mqtt: PUBLISH with QoS 3|"
    "mqtt: PUBLISH without packet id|mqtt: PUBLISH with packet id 0|"
    "mqtt: %s of %d bytes, expected 2|mqtt: connect() while not disconnected|"
    "mqtt: %d messages await PUBACK|mqtt: no PINGRESP within %d s|"
    "mqtt: feed() while disconnected|"
    "mqtt: expected CONNACK, got packet type %d|mqtt: malformed CONNACK|"
    "mqtt: broker refused the connection: %s (code %d)|"
    "mqtt: QoS 2 PUBLISH on a QoS 1 subscription|"
    "mqtt: SUBACK without return codes|"
    "mqtt: unexpected packet type %d from the broker|mqtt: not connected|"
    "mqtt: no free packet id|unknown|unacceptable protocol version|"
    "client identifier rejected|server unavailable|bad user name or password|"
    "not authorized")
_M_LENGTH = const(0)
_M_NUL = const(1)
_M_STRING = const(2)
_M_KEEPALIVE = const(3)
_M_QOS = const(4)
_M_TOPIC = const(5)
_M_NO_FILTER = const(6)
_M_LENGTH_BYTES = const(7)
_M_PACKET = const(8)
_M_PAST = const(9)
_M_UTF8 = const(10)
_M_QOS3 = const(11)
_M_NO_ID = const(12)
_M_ID0 = const(13)
_M_SHORT = const(14)
_M_CONNECT = const(15)
_M_WINDOW = const(16)
_M_PING = const(17)
_M_FEED = const(18)
_M_NOT_CONNACK = const(19)
_M_CONNACK = const(20)
_M_REFUSED = const(21)
_M_QOS2 = const(22)
_M_SUBACK = const(23)
_M_UNEXPECTED = const(24)
_M_DOWN = const(25)
_M_NO_FREE_ID = const(26)
_M_CODE_UNKNOWN = const(27)
_M_CODE1 = const(28)
_M_CODE2 = const(29)
_M_CODE3 = const(30)
_M_CODE4 = const(31)
_M_CODE5 = const(32)


# Events returned by ``feed`` are tuples (cheaper than classes on a 64 KiB heap):
#   (CONNACK, session_present)        CONNACK accepted
#   (PUBACK, packet_id)               our QoS 1 publish was acknowledged
#   (SUBACK, packet_id, granted)      granted QoS per filter, 0x80 = refused
#   (PUBLISH, topic, payload, retain) a message for us (already acknowledged if QoS 1)
#   (PINGRESP,)                       the broker answered PINGREQ


# --- encoding ----------------------------------------------------------------------------
def encode_length(n):
    """Remaining Length (§2.2.3): 7 bits per byte, continuation bit 0x80, at most 4 bytes."""
    if n < 0 or n > _REMAINING_LENGTH_MAX:
        raise ValueError(text(_TEXTS, _M_LENGTH, (n,)))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_str(s, limit=_MAX_TOPIC_BYTES):
    """UTF-8 string with a two-byte length prefix (§1.5.3)."""
    b = s.encode() if isinstance(s, str) else bytes(s)
    if b"\x00" in b:
        raise ValueError(text(_TEXTS, _M_NUL))
    if len(b) > limit:
        raise ValueError(text(_TEXTS, _M_STRING, (len(b), limit)))
    return len(b).to_bytes(2, "big") + b


def packet(ptype, flags, data):
    """Fixed header + body (``data``)."""
    return bytes([(ptype << 4) | flags]) + encode_length(len(data)) + data


def encode_connect(client_id, keepalive_s, clean_session, username=None):
    """CONNECT (§3.1), no will message."""
    flags = 0x02 if clean_session else 0
    payload = encode_str(client_id, _MAX_CLIENT_ID_BYTES)
    if username is not None:
        flags |= 0x80
        payload += encode_str(username, _MAX_CLIENT_ID_BYTES)
    if keepalive_s < 0 or keepalive_s > 0xFFFF:
        raise ValueError(text(_TEXTS, _M_KEEPALIVE, (keepalive_s,)))
    head = b"\x00\x04MQTT\x04" + bytes([flags]) + keepalive_s.to_bytes(2, "big")
    return packet(_CONNECT, 0, head + payload)


def publish_header(topic, payload_len, qos=0, retain=False, packet_id=0, dup=False):
    """The bytes of a PUBLISH (§3.3) before its payload of ``payload_len`` bytes: the
    client queues header and payload one after the other, never a joined copy."""
    if qos not in (0, 1):
        raise ValueError(text(_TEXTS, _M_QOS, (qos,)))
    if not topic or "+" in topic or "#" in topic:  # a topic name, not a filter (§4.7)
        raise ValueError(text(_TEXTS, _M_TOPIC, (topic,)))
    flags = (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = encode_str(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    return bytes([(PUBLISH << 4) | flags]) + encode_length(len(body) + payload_len) + body


def encode_subscribe(packet_id, filters):
    """SUBSCRIBE (§3.8): ``filters`` is a list of (topic filter, max QoS)."""
    if not filters:
        raise ValueError(text(_TEXTS, _M_NO_FILTER))
    body = packet_id.to_bytes(2, "big")
    for topic, qos in filters:
        body += encode_str(topic) + bytes([qos])
    return packet(_SUBSCRIBE, 2, body)


def encode_puback(packet_id):
    return packet(PUBACK, 0, packet_id.to_bytes(2, "big"))


_PINGREQ_BYTES = const(b"\xc0\x00")


# --- decoding ------------------------------------------------------------------------------
def split_packet(buf, max_packet=_MAX_PACKET_BYTES):
    """Find the first whole packet in ``buf``.

    Returns ``(ptype, flags, body_start, end)`` or ``None`` when more bytes are needed.
    Raises ``MalformedError`` for a bad length encoding and ``LimitError`` for a packet
    over ``max_packet`` bytes (checked before the body arrives).
    """
    n = len(buf)
    if n < 2:
        return None
    length = 0
    shift = 0
    i = 1
    while True:
        if i >= n:
            return None
        if i > 4:
            raise MalformedError(text(_TEXTS, _M_LENGTH_BYTES))
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    if i + length > max_packet:
        raise LimitError(text(_TEXTS, _M_PACKET, (i + length, max_packet)))
    if n < i + length:
        return None
    return buf[0] >> 4, buf[0] & 0x0F, i, i + length


def decode_str(data, pos):
    """Read a length-prefixed UTF-8 string; returns (text, next position)."""
    if pos + 2 > len(data):
        raise MalformedError(text(_TEXTS, _M_PAST))
    n = (data[pos] << 8) | data[pos + 1]
    end = pos + 2 + n
    if end > len(data):
        raise MalformedError(text(_TEXTS, _M_PAST))
    try:
        s = bytes(data[pos + 2:end]).decode()
    except UnicodeError as e:
        raise MalformedError(text(_TEXTS, _M_UTF8)) from e
    if "\x00" in s:
        raise MalformedError(text(_TEXTS, _M_NUL))
    return s, end


def decode_publish(flags, data):
    """A PUBLISH body (``data``) -> (topic, payload, qos, retain, dup, packet_id)."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedError(text(_TEXTS, _M_QOS3))
    topic, pos = decode_str(data, 0)
    if not topic or "+" in topic or "#" in topic:
        raise MalformedError(text(_TEXTS, _M_TOPIC, (topic,)))
    packet_id = 0
    if qos:
        if pos + 2 > len(data):
            raise MalformedError(text(_TEXTS, _M_NO_ID))
        packet_id = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if packet_id == 0:
            raise MalformedError(text(_TEXTS, _M_ID0))
    return topic, bytes(data[pos:]), qos, bool(flags & 1), bool(flags & 8), packet_id


def _packet_id(data, name):
    if len(data) != 2:
        raise MalformedError(text(_TEXTS, _M_SHORT, (name, len(data))))
    return (data[0] << 8) | data[1]


def _frozen(payload):
    """``payload`` (bytes-like or a tuple of chunks) as bytes the caller cannot change:
    a ``bytearray`` or ``memoryview`` (the agent's reused read buffer) is copied."""
    if isinstance(payload, tuple):
        return tuple(_frozen(chunk) for chunk in payload)
    return payload if isinstance(payload, bytes) else bytes(payload)


# --- the state machine -------------------------------------------------------------------
class Client:
    """One MQTT session seen from the client. Not thread-safe; one connection at a time.

    Typical use: ``connect()`` once the socket is up, send the chunks ``chunks_to_send()``
    hands over, pass every received chunk to ``feed()`` and handle the events, call
    ``tick(now_ms)`` about once a second. When the transport breaks call
    ``connection_lost()`` and later ``connect()`` again: unacknowledged QoS 1 messages are
    re-sent after the next CONNACK.

    ``now_ms`` must be a clock that does not wrap (``mqtt_async`` builds one from
    ``time.ticks_ms``).
    """

    def __init__(self, client_id, keepalive_s=_KEEPALIVE_S, clean_session=True,
                 username=None, max_inflight=_MAX_INFLIGHT,
                 max_packet=_MAX_PACKET_BYTES, keep_inflight=True):
        self.client_id = client_id
        self.keep_inflight = keep_inflight
        self.keepalive_ms = keepalive_s * 1000
        self.clean_session = clean_session
        self.username = username
        self.max_inflight = max_inflight
        self.max_packet = max_packet
        self.state = DISCONNECTED
        self.sessions = 0  # CONNACKs accepted: tells a caller a new connection began
        self._out = []  # queued chunks, in order; a PUBLISH payload is never copied
        self._in = b""
        self._next_id = 0
        self._inflight = []  # [packet_id, topic, payload, retain], oldest first
        self._pending_subs = []  # packet ids of SUBSCRIBEs awaiting SUBACK
        self._last_sent_ms = 0
        self._ping_sent_ms = None

    # --- outbound -------------------------------------------------------------------
    def connect(self, now_ms=0):
        """Queue CONNECT. Valid only when disconnected."""
        if self.state != DISCONNECTED:
            raise ValueError(text(_TEXTS, _M_CONNECT))
        self._in = b""
        self._out = []
        self._ping_sent_ms = None
        self._send(encode_connect(self.client_id, self.keepalive_ms // 1000,
                                  self.clean_session, self.username), now_ms)
        self.state = _CONNECTING

    def publish(self, topic, payload, qos=0, retain=False, now_ms=0):
        """Queue a PUBLISH; returns its packet id (0 for QoS 0). ``payload`` is bytes-like
        or a tuple of bytes-like chunks (queued one after the other, never joined)."""
        self._require_connected()
        packet_id = 0
        if qos == 1:
            if len(self._inflight) >= self.max_inflight:
                raise LocalError(text(_TEXTS, _M_WINDOW, (len(self._inflight),)))
            packet_id = self._new_packet_id()
            if self.keep_inflight:  # kept for a re-send: a buffer the caller reuses is copied
                payload = _frozen(payload)
        self._send_publish(topic, payload, qos, retain, packet_id, False, now_ms)
        if qos == 1:  # kept for a re-send only where one can happen: no payload pinned else
            self._inflight.append([packet_id, topic, payload, retain] if self.keep_inflight
                                  else [packet_id])
        return packet_id

    def subscribe(self, filters, now_ms=0):
        """Queue SUBSCRIBE for [(filter, qos<=1), ...]; returns its packet id."""
        self._require_connected()
        for _topic, qos in filters:
            if qos not in (0, 1):
                raise ValueError(text(_TEXTS, _M_QOS, (qos,)))
        packet_id = self._new_packet_id()
        self._send(encode_subscribe(packet_id, filters), now_ms)
        self._pending_subs.append(packet_id)
        return packet_id

    @property
    def queued(self):
        """True while chunks wait in the queue (a PUBLISH payload is still referenced)."""
        return bool(self._out)

    def chunks_to_send(self):
        """Take the queued chunks, in order (may be empty): the queue itself, handed over,
        and a fresh one started. A PUBLISH payload is the caller's object, not a copy:
        joining it to its header would need both in RAM twice, in one piece."""
        chunks = self._out
        self._out = []
        return chunks

    def tick(self, now_ms):
        """Keep-alive (§3.1.2.10): send PINGREQ when idle; fail when PINGRESP is late."""
        if self.state != CONNECTED or not self.keepalive_ms:
            return
        if self._ping_sent_ms is not None:
            if now_ms - self._ping_sent_ms >= self.keepalive_ms:
                raise TransportError(text(_TEXTS, _M_PING, (self.keepalive_ms // 1000,)))
        elif now_ms - self._last_sent_ms >= self.keepalive_ms // 2:
            # Half the interval: the broker allows 1.5x, so a slow link still keeps us alive.
            self._send(_PINGREQ_BYTES, now_ms)
            self._ping_sent_ms = now_ms

    def connection_lost(self):
        """The transport broke: forget the partial input. In-flight messages are kept for
        the next connection, or with ``keep_inflight=False`` forgotten too."""
        self.state = DISCONNECTED
        if not self.keep_inflight:
            self._inflight = []
        self._in = b""
        self._out = []
        self._pending_subs = []
        self._ping_sent_ms = None

    def can_publish(self):
        return self.state == CONNECTED and len(self._inflight) < self.max_inflight

    # --- inbound --------------------------------------------------------------------
    def feed(self, data, now_ms=0):
        """Take bytes from the broker; returns the list of events they complete."""
        if self.state == DISCONNECTED:
            raise ValueError(text(_TEXTS, _M_FEED))
        buf = self._in + bytes(data) if self._in else bytes(data)
        events = []
        start = 0
        while True:
            view = memoryview(buf)[start:]
            found = split_packet(view, self.max_packet)
            if found is None:
                break
            ptype, flags, body_start, end = found
            self._handle(ptype, flags, view[body_start:end], events, now_ms)
            start += end
        self._in = buf[start:] if start < len(buf) else b""
        return events

    def _handle(self, ptype, flags, data, events, now_ms):
        if self.state == _CONNECTING:
            if ptype != CONNACK:
                raise MalformedError(text(_TEXTS, _M_NOT_CONNACK, (ptype,)))
            if len(data) != 2 or flags:
                raise MalformedError(text(_TEXTS, _M_CONNACK))
            code = data[1]
            if code:  # a ``TransportError``, not a class per case (~300 bytes each)
                self.state = DISCONNECTED
                raise TransportError(text(_TEXTS, _M_REFUSED, (text(
                    _TEXTS, _M_CODE_UNKNOWN + (code if code <= 5 else 0)), code)))
            self.state = CONNECTED
            self.sessions += 1
            events.append((CONNACK, bool(data[0] & 1)))
            for item in self._inflight:  # §4.4: re-send unacknowledged, in order, DUP set
                self._send_publish(item[1], item[2], 1, item[3], item[0], True, now_ms)
            return
        if ptype == PUBLISH:
            topic, payload, qos, retain, _dup, packet_id = decode_publish(flags, data)
            if qos == 2:
                raise MalformedError(text(_TEXTS, _M_QOS2))
            if qos == 1:
                self._send(encode_puback(packet_id), now_ms)
            events.append((PUBLISH, topic, payload, retain))
        elif ptype == PUBACK:
            packet_id = _packet_id(data, "PUBACK")
            for i, item in enumerate(self._inflight):
                if item[0] == packet_id:
                    del self._inflight[i]
                    events.append((PUBACK, packet_id))
                    break
            # A PUBACK for an id we no longer hold (answer to a DUP): nothing to do.
        elif ptype == SUBACK:
            if len(data) < 3:
                raise MalformedError(text(_TEXTS, _M_SUBACK))
            packet_id = (data[0] << 8) | data[1]
            if packet_id in self._pending_subs:
                self._pending_subs.remove(packet_id)
            events.append((SUBACK, packet_id, bytes(data[2:])))
        elif ptype == PINGRESP:
            self._ping_sent_ms = None
            events.append((PINGRESP,))
        else:
            raise MalformedError(text(_TEXTS, _M_UNEXPECTED, (ptype,)))

    # --- helpers ----------------------------------------------------------------------
    def _require_connected(self):
        if self.state != CONNECTED:
            raise TransportError(text(_TEXTS, _M_DOWN))

    def _send(self, data, now_ms):
        self._out.append(data)
        self._last_sent_ms = now_ms

    def _send_publish(self, topic, payload, qos, retain, packet_id, dup, now_ms):
        if isinstance(payload, tuple):
            n = 0
            for chunk in payload:
                n += len(chunk)
            self._send(publish_header(topic, n, qos, retain, packet_id, dup), now_ms)
            self._out.extend(payload)
        else:
            self._send(publish_header(topic, len(payload), qos, retain, packet_id, dup),
                       now_ms)
            self._out.append(payload)

    def _new_packet_id(self):
        busy = [item[0] for item in self._inflight] + self._pending_subs
        for _ in range(len(busy) + 1):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in busy:
                return self._next_id
        raise LocalError(text(_TEXTS, _M_NO_FREE_ID))
