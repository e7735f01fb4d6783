"""Serial framing for provisioning: a sans-IO codec shared by the device and the laptop.

A frame on the wire::

    MAGIC (2 bytes) | length (2 bytes, big endian) | body (length bytes) | CRC-32 (4 bytes, BE)

The body is one CBOR map (deterministic, ``cbor.dumps``) whose key 0 is the message type
(``T_*`` below); the other keys are the message's fields (``F_*``). The CRC is CRC-32
(IEEE 802.3, the ``binascii.crc32`` / zlib polynomial) over the two length bytes and the
body, so a corrupted length is caught as surely as a corrupted body.

``FrameDecoder.feed(data)`` returns, in order, each decoded message (a dict) and each
fault as a ``FrameError`` *value* (not raised), so one bad frame never hides the good ones
after it. Faults and recovery:

- bytes before a magic (line noise, a boot banner): skipped and reported once per run
  as ``E_GARBAGE`` with the number of bytes skipped;
- a length over ``max_body`` (``FRAME_MAX_BODY_BYTES`` by default): ``E_OVERSIZE``; the
  decoder skips the magic and searches again (the length may itself be noise);
- a CRC mismatch: ``E_CRC``; skips the magic and searches again, so a frame hidden inside a
  corrupted one is still found;
- a good CRC but a body that is not a CBOR map with an integer type: ``E_MALFORMED``; the
  whole frame is consumed.

The decoder never holds more than one frame's worth of bytes (``max_body + 8``) and never
waits for anything but bytes: a frame cut short stays pending until more bytes come, and
the transport's timeout (not the codec) decides when to give up (``reset()``).

Messages (host request -> device reply; every request may carry ``F_ID`` = 15, an int the
device echoes in its reply or error, so a stale reply never answers a newer request):

============  =====================================  ======================================
type          request fields                         reply fields
============  =====================================  ======================================
hello (1)     -                                      1 model, 2 serial, 3 firmware, 4 state,
                                                     5 device URN, 6 protocol, 7 kid,
                                                     8 claim secret (while not locked)
generate_key  -                                      1 public key (SEC1), 7 kid
csr (3)       -                                      1 PKCS#10 DER
install (4)   1 chain [DER], 2 CA [DER], 3 broker    7 kid (4 state "pending-enrollment"
              {host, port, server_hostname},         when it carried a ticket); with a
              4 config {..}, 5 fleet keys [SEC1],    statement: 9 "installed" (10 the
              9 the root's trust statement (COSE,    version held) or "refused" (3 why)
              at most 1 KiB, optional), 10 the
              host's UNIX time (optional), or
              6 ticket (offline provisioning)
self_test     1 timeout (s)                          1 ok, 2 stage, 3 message, 4 seq
lock (6)      -                                      4 state
unlock (7)    1 COSE_Sign1 fleet command "unlock"    4 state
error (8)     -                                      1 code (``E_*``), 3 message
============  =====================================  ======================================

Error codes also name the device's protocol refusals (``E_ORDER``, ``E_LOCKED``, ...),
which travel in a ``T_ERROR`` message: ``{0: T_ERROR, F_CODE: code, F_MESSAGE: text}``.
Maps keep fields they do not know (a newer host or device may add some).
"""

try:
    from binascii import crc32 as _crc32
except ImportError:  # pragma: no cover - a port built without binascii.crc32
    _crc32 = None  # type: ignore[assignment]

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, limits
from .errors import MalformedError

MAGIC = b"\xce\x7e"  # two bytes that open every frame
HEADER_BYTES = const(4)  # magic + length
CRC_BYTES = const(4)
FRAME_MAX_BODY_BYTES = limits.FRAME_MAX_BODY_BYTES

# Message types (key 0 of every body).
T_HELLO = const(1)
T_GENERATE_KEY = const(2)
T_CSR = const(3)
T_INSTALL = const(4)
T_SELF_TEST = const(5)
T_LOCK = const(6)
T_UNLOCK = const(7)
T_ERROR = const(8)

TYPE_NAMES = {
    T_HELLO: "hello",
    T_GENERATE_KEY: "generate_key",
    T_CSR: "csr",
    T_INSTALL: "install",
    T_SELF_TEST: "self_test",
    T_LOCK: "lock",
    T_UNLOCK: "unlock",
    T_ERROR: "error",
}

# Field keys. Each message uses its own small set; the same key may mean different things
# in different message types, as listed here.
F_TYPE = const(0)
F_ID = const(15)  # request id: the device echoes it in the reply (and in its error)
# hello reply
F_MODEL = const(1)
F_SERIAL = const(2)
F_FIRMWARE = const(3)
F_STATE = const(4)
F_DEVICE = const(5)  # device URN (RFC 9039)
F_PROTOCOL = const(6)  # protocol version (int)
F_KID = const(7)  # COSE kid of the device key, once there is one
F_CLAIM = const(8)  # the vendor's claim secret (text), while the device is not locked
# generate_key reply: F_PUBLIC_KEY; csr reply: F_CSR
F_PUBLIC_KEY = const(1)  # SEC1 uncompressed point, 65 bytes
F_CSR = const(1)  # PKCS#10 DER
# install request
F_CHAIN = const(1)  # list of DER certificates, the device's own first
F_CA = const(2)  # list of DER CA certificates the device trusts for the broker
F_BROKER = const(3)  # {"host": str, "port": int, "server_hostname": str}
F_CONFIG = const(4)  # device config map (as the fleet gave it)
F_FLEET_KEYS = const(5)  # list of SEC1 fleet public keys trusted for commands
F_TICKET = const(6)  # offline provisioning: the enrollment ticket instead of a chain
F_STATEMENT = const(9)  # the offline root's trust statement of the fleet's command keys
# (``trust_statement``; the fleet's enrollment answer), checked by the device against its root
F_NOW = const(10)  # the host's UNIX time: the statement's window, for a device with no clock
# install reply, when the request carried a statement
F_TRUST = const(9)  # "installed" or "refused" (the reason in F_MESSAGE)
F_TRUST_VERSION = const(10)  # the statement version the device holds (when installed)
# self_test request: F_TIMEOUT; reply: F_OK, F_STAGE, F_MESSAGE, F_SEQ
F_TIMEOUT = const(1)  # seconds the device may spend on the self-test
F_OK = const(1)
F_STAGE = const(2)  # "connect", "tls", "mqtt", "publish", "done"
F_SEQ = const(4)
# unlock request
F_COMMAND = const(1)  # COSE_Sign1 fleet command named "unlock" for this device
# error
F_CODE = const(1)
F_MESSAGE = const(3)

# Error codes: framing faults (the decoder) and protocol refusals (the device).
E_GARBAGE = const(1)
E_CRC = const(2)
E_OVERSIZE = const(3)
E_MALFORMED = const(4)
E_UNKNOWN_TYPE = const(5)
E_ORDER = const(6)  # a step before the step it needs (e.g. csr before generate_key)
E_LOCKED = const(7)  # provisioning is locked; only hello and an authenticated unlock
E_BAD_INPUT = const(8)  # fields missing or wrong (e.g. a certificate not for our key)
E_STORAGE = const(9)  # the device could not write its flash
E_INTERNAL = const(10)

ERROR_NAMES = {
    E_GARBAGE: "garbage",
    E_CRC: "crc",
    E_OVERSIZE: "oversize",
    E_MALFORMED: "malformed",
    E_UNKNOWN_TYPE: "unknown_type",
    E_ORDER: "order",
    E_LOCKED: "locked",
    E_BAD_INPUT: "bad_input",
    E_STORAGE: "storage",
    E_INTERNAL: "internal",
}


class FrameError(MalformedError):
    """A frame that could not be decoded, or a refusal carried in an error frame."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return "FrameError(%s, %r)" % (ERROR_NAMES.get(self.code, self.code), self.message)


_TABLE: "list[int]" = []


def crc32(data: "Any") -> int:
    """CRC-32 (IEEE); ``binascii.crc32`` where the port has it, a table otherwise."""
    if _crc32 is not None:
        return _crc32(data) & 0xFFFFFFFF
    if not _TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            _TABLE.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def encode_frame(msg: "dict[int, Any]", max_body: int = FRAME_MAX_BODY_BYTES) -> bytes:
    """One frame carrying ``msg`` (a dict with an int ``F_TYPE``)."""
    if not isinstance(msg, dict) or not isinstance(msg.get(F_TYPE), int):
        raise ValueError("a message is a dict with an int type at key 0")
    body = cbor.dumps(msg)
    if len(body) > max_body:
        raise ValueError("message body is %d bytes, over the %d-byte frame limit"
                         % (len(body), max_body))
    n = len(body)
    head = bytes((n >> 8, n & 0xFF))
    crc = crc32(head + body)
    return MAGIC + head + body + crc.to_bytes(4, "big")


def error_message(code: int, message: str) -> "dict[int, Any]":
    return {F_TYPE: T_ERROR, F_CODE: code, F_MESSAGE: message}


def as_error(msg: "dict[int, Any]") -> FrameError:
    """The ``FrameError`` an error message carries (its code and text)."""
    code = msg.get(F_CODE)
    text = msg.get(F_MESSAGE)
    return FrameError(code if isinstance(code, int) else E_INTERNAL,
                      text if isinstance(text, str) else "device error")


class FrameDecoder:
    """Bytes in, messages and ``FrameError`` values out (rules in the module docstring)."""

    def __init__(self, max_body: int = FRAME_MAX_BODY_BYTES) -> None:
        if not 0 < max_body <= 0xFFFF:
            raise ValueError("max_body must be 1..65535 bytes")
        self.max_body = max_body
        self._buf = bytearray()
        self.garbage_bytes = 0  # bytes skipped since the decoder was made (a counter)

    def pending(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget a partial frame (after a timeout, the transport calls this)."""
        self._buf = bytearray()

    def feed(self, data: "Any") -> "list[Any]":
        out: "list[Any]" = []
        buf = self._buf
        buf.extend(data)
        skipped = 0
        while buf:
            i = buf.find(MAGIC)
            if i < 0:
                # keep a trailing first magic byte: the second may come in the next read
                keep = 1 if buf[-1] == MAGIC[0] else 0
                skipped += len(buf) - keep
                buf = buf[len(buf) - keep:] if keep else bytearray()
                break
            if i:
                skipped += i
                buf = buf[i:]
            if skipped:
                out.append(FrameError(E_GARBAGE, "%d bytes of noise skipped" % skipped))
                self.garbage_bytes += skipped
                skipped = 0
            if len(buf) < HEADER_BYTES:
                break
            n = (buf[2] << 8) | buf[3]
            if n > self.max_body:
                out.append(FrameError(E_OVERSIZE, "frame of %d bytes, over the %d-byte limit"
                                      % (n, self.max_body)))
                buf = buf[2:]
                continue
            end = HEADER_BYTES + n + CRC_BYTES
            if len(buf) < end:
                break
            crc = int.from_bytes(bytes(buf[end - CRC_BYTES:end]), "big")
            if crc32(bytes(buf[2:end - CRC_BYTES])) != crc:
                out.append(FrameError(E_CRC, "CRC mismatch in a %d-byte frame" % n))
                buf = buf[2:]
                continue
            body = bytes(buf[HEADER_BYTES:end - CRC_BYTES])
            buf = buf[end:]
            out.append(_decode_body(body, self.max_body))
        if skipped:
            out.append(FrameError(E_GARBAGE, "%d bytes of noise skipped" % skipped))
            self.garbage_bytes += skipped
        self._buf = buf
        return out


def _decode_body(body: bytes, max_body: int) -> "Any":
    try:
        msg = cbor.loads(body, max_bytes=max_body)
    except MalformedError as e:
        return FrameError(E_MALFORMED, "frame body is not CBOR: %s" % e)
    if not isinstance(msg, dict) or not isinstance(msg.get(F_TYPE), int) \
            or isinstance(msg.get(F_TYPE), bool):
        return FrameError(E_MALFORMED, "frame body is not a map with an int type at key 0")
    return msg
