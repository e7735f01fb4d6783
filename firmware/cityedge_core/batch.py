"""The reading batch: what a device signs once per N readings.

A batch is a CBOR map (integer keys, below) carried as the payload of a COSE_Sign1 ES256
message. The map links to the previous batch by SHA-256 over that batch's complete COSE
bytes, so the receiver can tell drops, duplicates, reordering and replays apart
(see ``chain``).

=====  ==========  ============================================================
key    name        value
=====  ==========  ============================================================
1      kind        0 readings, 1 drop record (the buffer dropped batches)
2      device      RFC 9039 device URN, e.g. ``urn:dev:mac:0024befffe804ff1``
3      seq         per-device sequence number, 1, 2, 3 ... (never reused, survives reboots)
4      prev        SHA-256 of the previous batch's COSE bytes; 32 zero bytes before seq 1
5      boot        boot counter of the device when it signed
6      timebase    0: SenML times are UNIX seconds (clock set by NTP)
                   1: SenML times are seconds since boot (no trusted clock yet)
7      records     SenML pack (RFC 8428, CBOR labels), at most ``BATCH_MAX_RECORDS``
8      dropped     drop records only: [first_seq, last_seq, batches, readings]
=====  ==========  ============================================================

Keys we do not know are kept in ``Batch.extra`` and written back unchanged, so firmware N
and fleet N+1 can talk. Keys 0-63 are reserved for this format.
"""

import hashlib

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, cose, limits
from .errors import LimitError, MalformedError

KIND_READINGS = 0
KIND_DROP = 1
TIME_UNIX = 0
TIME_SINCE_BOOT = 1
ZERO_HASH = bytes(32)

F_KIND = 1
F_DEVICE = 2
F_SEQ = 3
F_PREV = 4
F_BOOT = 5
F_TIMEBASE = 6
F_RECORDS = 7
F_DROPPED = 8
_KNOWN = (F_KIND, F_DEVICE, F_SEQ, F_PREV, F_BOOT, F_TIMEBASE, F_RECORDS, F_DROPPED)
_URN_SET = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:")


def check_device_id(device: Any) -> None:
    """An RFC 9039 ``urn:dev:`` name that is also safe as an MQTT topic level and a CN."""
    if not isinstance(device, str):
        raise MalformedError("batch: device id must be text")
    if len(device) > limits.DEVICE_ID_MAX_CHARS:
        raise LimitError("batch: device id longer than %d" % limits.DEVICE_ID_MAX_CHARS)
    if not device.startswith("urn:dev:") or len(device) < 10:
        raise MalformedError("batch: device id %r is not an RFC 9039 urn:dev: name" % device)
    if not set(device) <= _URN_SET:
        for ch in device:
            if ch not in _URN_SET:
                raise MalformedError("batch: device id has character %r" % ch)


def _uint(obj: Any, key: int, name: str, top: int) -> int:
    val = obj.get(key)
    if not isinstance(val, int) or isinstance(val, bool) or val < 0 or val > top:
        raise MalformedError("batch: %s must be an integer in 0..%d" % (name, top))
    return val


class Batch:
    """A decoded reading batch or drop record (the signed payload, not the envelope)."""

    def __init__(
        self,
        device: str,
        seq: int,
        prev: bytes,
        boot: int,
        records: Any,
        timebase: int = TIME_UNIX,
        kind: int = KIND_READINGS,
        dropped: Any = None,
        extra: Any = None,
    ) -> None:
        self.device = device
        self.seq = seq
        self.prev = prev
        self.boot = boot
        self.records = records
        self.timebase = timebase
        self.kind = kind
        self.dropped = dropped
        self.extra = extra if extra is not None else {}

    def to_map(self) -> dict[int, Any]:
        out = {}
        for key in self.extra:
            out[key] = self.extra[key]
        out[F_KIND] = self.kind
        out[F_DEVICE] = self.device
        out[F_SEQ] = self.seq
        out[F_PREV] = self.prev
        out[F_BOOT] = self.boot
        out[F_TIMEBASE] = self.timebase
        out[F_RECORDS] = self.records
        if self.dropped is not None:
            out[F_DROPPED] = self.dropped
        return out

    def encode(self) -> bytes:
        """Deterministic CBOR of the batch map (the COSE payload)."""
        return cbor.dumps(self.to_map())

    @classmethod
    def from_map(cls, obj: Any) -> "Batch":
        """Validate a decoded payload map and build a ``Batch`` (raises ``MalformedError``)."""
        if not isinstance(obj, dict):
            raise MalformedError("batch: payload is not a map")
        kind = _uint(obj, F_KIND, "kind", 1)
        device: Any = obj.get(F_DEVICE)
        check_device_id(device)
        seq = _uint(obj, F_SEQ, "seq", limits.SEQ_MAX)
        if seq == 0:
            raise MalformedError("batch: seq starts at 1")
        prev = obj.get(F_PREV)
        if not isinstance(prev, bytes) or len(prev) != 32:
            raise MalformedError("batch: prev must be a 32-byte SHA-256")
        boot = _uint(obj, F_BOOT, "boot", 0xFFFFFFFF)
        timebase = _uint(obj, F_TIMEBASE, "timebase", 1)
        records = obj.get(F_RECORDS)
        from . import senml  # loaded only by receivers: signing devices save the heap

        senml.validate_pack(records)
        dropped = obj.get(F_DROPPED)
        if kind == KIND_DROP:
            if not isinstance(dropped, list) or len(dropped) != 4:
                raise MalformedError("batch: drop record needs [first, last, batches, readings]")
            for v in dropped:
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise MalformedError("batch: drop record counts must be unsigned integers")
            if not 0 < dropped[0] <= dropped[1] < seq:
                raise MalformedError("batch: drop record range must precede its own seq")
        elif dropped is not None:
            raise MalformedError("batch: only a drop record carries 'dropped'")
        extra = {}
        for key in obj:
            if key not in _KNOWN:
                extra[key] = obj[key]
        return cls(device, seq, prev, boot, records, timebase, kind, dropped, extra)

    @classmethod
    def decode(cls, payload: bytes) -> "Batch":
        return cls.from_map(cbor.loads(payload, max_bytes=limits.BATCH_MAX_BYTES))

    def __repr__(self) -> str:
        return "<Batch %s seq=%d records=%d>" % (self.device, self.seq, len(self.records))


def batch_hash(signed: bytes) -> bytes:
    """SHA-256 over a batch's complete COSE bytes: the value the next batch's prev holds."""
    return hashlib.sha256(signed).digest()


def sign_batch(batch: Batch, signer: Any, kid: bytes) -> bytes:
    """COSE_Sign1 (ES256) over the batch; returns the bytes to send and to hash."""
    payload = batch.encode()
    if len(payload) + 128 > limits.BATCH_MAX_BYTES:
        raise ValueError("batch too large: %d bytes payload" % len(payload))
    return cose.encode_sign1(payload, signer, kid)


class RecordBuffer:
    """Device side: SenML records encoded into one buffer as they are sampled.

    Holding 50 readings as dicts costs about 8 KB of MicroPython heap; encoded they take
    about 15 bytes each. ``add`` appends one record's deterministic CBOR; the payload
    ``BatchWriter.sign_buffer`` makes is byte-identical to ``Batch.encode`` of the same
    records (a property test checks this).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.count = 0

    def add(self, record: Any) -> None:
        """Append one SenML record (a dict keyed by CBOR labels)."""
        if self.count >= limits.BATCH_MAX_RECORDS:
            raise ValueError("batch full: %d records" % limits.BATCH_MAX_RECORDS)
        cbor.encode_into(self.data, record)
        self.count += 1

    def clear(self) -> None:
        self.data = bytearray()
        self.count = 0


def payload_parts(
    device: str,
    seq: int,
    prev: bytes,
    boot: int,
    timebase: int,
    kind: int,
    records: RecordBuffer,
    dropped: Any = None,
) -> Any:
    """The deterministic batch map (keys 1..8 in order) as three consecutive chunks:
    the fields before the records, the records' own buffer (not copied), the drop range."""
    out = bytearray()
    cbor.encode_head(out, 5, 7 if dropped is None else 8)
    for key, value in (
        (F_KIND, kind), (F_DEVICE, device), (F_SEQ, seq), (F_PREV, prev), (F_BOOT, boot),
        (F_TIMEBASE, timebase),
    ):
        out.append(key)
        cbor.encode_into(out, value)
    out.append(F_RECORDS)
    cbor.encode_head(out, 4, records.count)
    tail = bytearray()
    if dropped is not None:
        tail.append(F_DROPPED)
        cbor.encode_into(tail, dropped)
    return (out, records.data, tail)


class BatchWriter:
    """Device side: numbers, links and signs batches. Persist ``seq``/``head`` after each.

    ``seq`` is the last sequence number used and ``head`` the hash of the last batch, both
    restored from storage at boot so the chain survives reboots.
    """

    def __init__(
        self, device: str, signer: Any, kid: bytes, seq: int = 0, head: bytes = ZERO_HASH
    ) -> None:
        check_device_id(device)
        self.device = device
        self.signer = signer
        self.kid = kid
        self.seq = seq
        self.head = head

    def sign(
        self,
        records: Any,
        boot: int,
        timebase: int = TIME_UNIX,
        kind: int = KIND_READINGS,
        dropped: Any = None,
    ) -> bytes:
        """Sign a list of SenML records as the next batch."""
        batch = Batch(self.device, self.seq + 1, self.head, boot, records, timebase, kind, dropped)
        return self._signed(sign_batch(batch, self.signer, self.kid))

    def sign_buffer(
        self,
        records: RecordBuffer,
        boot: int,
        timebase: int = TIME_UNIX,
        kind: int = KIND_READINGS,
        dropped: Any = None,
    ) -> bytes:
        """Sign the records of a ``RecordBuffer`` as the next batch (the device's path).

        The payload is never assembled: its chunks go to ``cose.encode_sign1_parts``.
        """
        parts = payload_parts(
            self.device, self.seq + 1, self.head, boot, timebase, kind, records, dropped
        )
        size = len(parts[0]) + len(parts[1]) + len(parts[2])
        if size + 128 > limits.BATCH_MAX_BYTES:
            raise ValueError("batch too large: %d bytes payload" % size)
        return self._signed(cose.encode_sign1_parts(parts, self.signer, self.kid))

    def _signed(self, signed: bytes) -> bytes:
        self.seq += 1
        self.head = batch_hash(signed)
        return signed
