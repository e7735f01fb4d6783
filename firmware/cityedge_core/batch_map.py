"""The decoded reading batch (``Batch``): validation for receivers, encoding for tests
and the gateway's own batches.

Format and keys: ``batch``. Split from it so a device, which signs its records through
``batch.BatchWriter.sign_buffer``, does not carry this class on its heap; ``batch``
re-exports ``Batch`` and ``sign_batch`` on CPython.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, cose, limits
from .batch import (
    _KNOWN,
    F_BOOT,
    F_DEVICE,
    F_DROPPED,
    F_KIND,
    F_PREV,
    F_RECORDS,
    F_SEQ,
    F_TIMEBASE,
    KIND_DROP,
    KIND_READINGS,
    TIME_UNIX,
    check_device_id,
)
from .errors import MalformedError


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


def sign_batch(batch: Batch, signer: Any, kid: bytes) -> bytes:
    """COSE_Sign1 (ES256) over the batch; returns the bytes to send and to hash."""
    payload = batch.encode()
    if len(payload) + 128 > limits.BATCH_MAX_BYTES:
        raise ValueError("batch too large: %d bytes payload" % len(payload))
    return cose.encode_sign1(payload, signer, kid)
