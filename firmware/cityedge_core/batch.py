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

``Batch`` (the decoded map, for receivers) lives in ``batch_map`` and is re-exported here
on CPython: a device signs through ``BatchWriter.sign_buffer`` and never carries it.
"""

import hashlib

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: Any) -> Any:
        return x


from . import cbor, cose
from .errors import LimitError, MalformedError, text

# limits (``limits``) as private consts: the compiler folds them, and the device
# never loads ``limits`` (its names would be interned: "Memory on the device");
# tests/core/test_limit_copies.py holds them equal to ``limits``
_BATCH_MAX_BYTES = const(16384)
_BATCH_MAX_RECORDS = const(256)
_DEVICE_ID_MAX_CHARS = const(128)
# The messages this module raises, one string constant (``errors.text``): on a device each
# string constant over 10 characters is an object of its own on the heap
_TEXTS = const("batch: device id must be text|batch: device id longer than %d|"
               "batch: device id %r is not an RFC 9039 urn:dev: name|"
               "batch: device id has character %r|batch full: %d records|"
               "batch too large: %d bytes payload")
_M_TEXT = const(0)
_M_LONG = const(1)
_M_URN = const(2)
_M_CHAR = const(3)
_M_FULL = const(4)
_M_LARGE = const(5)

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
# a string, not a set: a 66-entry set costs 640 bytes of a device's heap
_URN_CHARS = const("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:")


def check_device_id(device: Any) -> None:
    """An RFC 9039 ``urn:dev:`` name that is also safe as an MQTT topic level and a CN."""
    if not isinstance(device, str):
        raise MalformedError(text(_TEXTS, _M_TEXT))
    if len(device) > _DEVICE_ID_MAX_CHARS:
        raise LimitError(text(_TEXTS, _M_LONG, (_DEVICE_ID_MAX_CHARS,)))
    if not device.startswith("urn:dev:") or len(device) < 10:
        raise MalformedError(text(_TEXTS, _M_URN, (device,)))
    if device.strip(_URN_CHARS):  # something is left: a character outside the set
        for ch in device:
            if ch not in _URN_CHARS:
                raise MalformedError(text(_TEXTS, _M_CHAR, (ch,)))


def batch_hash(signed: bytes) -> bytes:
    """SHA-256 over a batch's complete COSE bytes: the value the next batch's prev holds."""
    return hashlib.sha256(signed).digest()


class RecordBuffer:
    """Device side: SenML records encoded into one buffer as they are sampled.

    Holding 50 readings as dicts costs about 8 KB of MicroPython heap; encoded they take
    about 15 bytes each. ``add`` appends one record's deterministic CBOR; the payload
    ``BatchWriter.sign_buffer`` makes is byte-identical to ``Batch.encode`` of the same
    records (a property test checks this).

    ``capacity`` bytes are allocated at once and kept across ``clear``: a device reuses
    one buffer for every batch instead of growing a new one record by record (each growth
    a new, larger block and a hole where the old one was: a small heap fragments). It
    grows only if the records outsize it.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.data = bytearray(capacity)  # the records are data[:size]
        self.size = 0
        self.count = 0

    def add(self, record: Any) -> None:
        """Append one SenML record (a dict keyed by CBOR labels)."""
        if self.count >= _BATCH_MAX_RECORDS:
            raise ValueError(text(_TEXTS, _M_FULL, (_BATCH_MAX_RECORDS,)))
        enc = bytearray()
        cbor.encode_into(enc, record)
        end = self.size + len(enc)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[self.size:end] = enc
        self.size = end
        self.count += 1

    def view(self) -> Any:
        """The records' bytes (a memoryview into the buffer: valid until the next ``add``)."""
        return memoryview(self.data)[:self.size]

    def clear(self) -> None:
        """Empty, keeping the allocation for the next batch."""
        self.size = 0
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
    return (out, records.view(), tail)


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
        from .batch_map import Batch, sign_batch  # on first use: a device never loads it

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
        """Sign the records of a ``RecordBuffer`` as the next batch; the signed bytes."""
        return cose.join_chunks(self.sign_chunks(records, boot, timebase, kind, dropped))

    def sign_chunks(
        self,
        records: RecordBuffer,
        boot: int,
        timebase: int = TIME_UNIX,
        kind: int = KIND_READINGS,
        dropped: Any = None,
    ) -> Any:
        """``sign_buffer`` as consecutive chunks (the device's path): neither the payload
        nor the signed batch is ever assembled, so the records' buffer is the largest
        piece a signature needs in one place (``cose.sign1_chunks``)."""
        parts = payload_parts(
            self.device, self.seq + 1, self.head, boot, timebase, kind, records, dropped
        )
        size = len(parts[0]) + len(parts[1]) + len(parts[2])
        if size + 128 > _BATCH_MAX_BYTES:
            raise ValueError(text(_TEXTS, _M_LARGE, (size,)))
        chunks = cose.sign1_chunks(parts, self.signer, self.kid)
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
        head = h.digest()  # before seq moves: a failure up to here leaves the chain as it was
        self.seq += 1
        self.head = head
        return chunks

    def _signed(self, signed: bytes) -> bytes:
        self.seq += 1
        self.head = batch_hash(signed)
        return signed


try:
    import micropython  # type: ignore[import-not-found, unused-ignore]  # noqa: F401 (tells the two apart)
except ImportError:  # CPython: the receiver side is part of this module's API
    from .batch_map import Batch as Batch
    from .batch_map import sign_batch as sign_batch
