"""The one place that accepts or rejects an incoming signed batch.

``BatchVerifier.check(data)`` takes the bytes a device (or a gateway relaying it) sent and
returns a ``Verdict`` with exactly one status:

=============  =========================================================================
status         meaning
=============  =========================================================================
ok             next in the chain: seq = last + 1 and prev = hash of the last batch
gap            newer than expected: ``missing`` batches were skipped (lost or dropped)
reordered      an older batch that was missing arrives late; it fills its gap
duplicate      the same bytes as a batch already accepted (an MQTT QoS 1 redelivery)
replay         an old sequence number that is neither missing nor a recent duplicate:
               an attacker re-sending captured batches, or a batch older than the window
fork           seq = last + 1 but prev is not the last batch's hash: the device lost or
               rewound its chain state (or its key is misused); accepted as the new head
bad_signature  the signature does not verify, or the payload names another device
unknown_key    the kid is not a key we trust (never enrolled, rotated out, or revoked)
malformed      not a well-formed COSE_Sign1 ES256 batch within limits
=============  =========================================================================

Order of checks: envelope (malformed) -> key (unknown_key) -> signature (bad_signature) ->
payload (malformed) -> payload device = key's device (bad_signature) -> chain. Nothing is
decoded from the payload before its signature is checked.

The chain state per device is small and bounded (``ChainState``): the last seq and hash,
the hashes of the last ``CHAIN_RECENT_HASHES`` batches, and up to
``CHAIN_MAX_PENDING_GAPS`` ranges of missing seqs. A drop record (``batch.KIND_DROP``)
marks its range as explained: those batches will never come.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import batch as batchmod
from . import cbor, cose, limits
from .batch_map import Batch
from .errors import MalformedError, PeerError, SignatureError, UnknownKeyError

OK = "ok"
GAP = "gap"
REORDERED = "reordered"
DUPLICATE = "duplicate"
REPLAY = "replay"
FORK = "fork"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_KEY = "unknown_key"
MALFORMED = "malformed"

ACCEPTED = (OK, GAP, REORDERED, FORK)  # statuses whose readings are new and stored


class ChainState:
    """What the receiver remembers of one device's chain (bounded; serialisable)."""

    def __init__(
        self,
        last_seq: int = 0,
        last_hash: bytes = batchmod.ZERO_HASH,
        recent: Any = None,
        missing: Any = None,
        forgotten: int = 0,
    ) -> None:
        self.last_seq = last_seq
        self.last_hash = last_hash
        self.recent = recent if recent is not None else []  # [[seq, hash], ...] newest last
        self.missing = missing if missing is not None else []  # [[first, last], ...] sorted
        self.forgotten = forgotten  # missing seqs given up on when over the range limit

    def to_list(self) -> list[Any]:
        return [self.last_seq, self.last_hash, self.recent, self.missing, self.forgotten]

    @classmethod
    def from_list(cls, obj: Any) -> "ChainState":
        return cls(obj[0], obj[1], obj[2], obj[3], obj[4])

    def to_bytes(self) -> bytes:
        return cbor.dumps(self.to_list())

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChainState":
        return cls.from_list(cbor.loads(data))

    def missing_count(self) -> int:
        n = 0
        for first, last in self.missing:
            n += last - first + 1
        return n

    def _remember(self, seq: int, digest: bytes) -> None:
        self.recent.append([seq, digest])
        if len(self.recent) > limits.CHAIN_RECENT_HASHES:
            self.recent.pop(0)

    def _add_missing(self, first: int, last: int) -> None:
        self.missing.append([first, last])
        while len(self.missing) > limits.CHAIN_MAX_PENDING_GAPS:
            old = self.missing.pop(0)
            self.forgotten += old[1] - old[0] + 1

    def _take_missing(self, seq: int) -> bool:
        """Remove ``seq`` from the missing ranges; False if it was not missing."""
        for i in range(len(self.missing)):
            first, last = self.missing[i]
            if first <= seq <= last:
                parts = []
                if first < seq:
                    parts.append([first, seq - 1])
                if seq < last:
                    parts.append([seq + 1, last])
                self.missing[i : i + 1] = parts
                return True
        return False

    def explain_drop(self, first: int, last: int) -> int:
        """A drop record says ``first..last`` will never come: stop waiting; return count."""
        explained = 0
        kept = []
        for a, b in self.missing:
            lo = a if a > first else first
            hi = b if b < last else last
            if lo > hi:
                kept.append([a, b])
                continue
            explained += hi - lo + 1
            if a < lo:
                kept.append([a, lo - 1])
            if hi < b:
                kept.append([hi + 1, b])
        self.missing = kept
        return explained

    def classify(self, seq: int, prev: bytes, digest: bytes) -> Any:
        """Classify a verified batch and update the state; returns (status, missing)."""
        if seq == self.last_seq + 1:
            status = OK if prev == self.last_hash else FORK
            self.last_seq = seq
            self.last_hash = digest
            self._remember(seq, digest)
            return status, 0
        if seq > self.last_seq:
            missing = seq - self.last_seq - 1
            self._add_missing(self.last_seq + 1, seq - 1)
            self.last_seq = seq
            self.last_hash = digest
            self._remember(seq, digest)
            return GAP, missing
        for s, h in self.recent:
            if s == seq and h == digest:
                return DUPLICATE, 0
        if self._take_missing(seq):
            self._remember(seq, digest)
            return REORDERED, 0
        return REPLAY, 0


class KeyEntry:
    """A key the receiver trusts: the device it belongs to and a verifier for it."""

    def __init__(self, device: str, verifier: Any, revoked: bool = False) -> None:
        self.device = device
        self.verifier = verifier
        self.revoked = revoked


class Verdict:
    """The outcome of ``BatchVerifier.check``: a status and what was learned."""

    def __init__(
        self,
        status: str,
        reason: str = "",
        batch: Any = None,
        digest: bytes = b"",
        missing: int = 0,
        kid: Any = None,
        explained: int = 0,
    ) -> None:
        self.status = status
        self.reason = reason
        self.batch = batch
        self.digest = digest
        self.missing = missing
        self.kid = kid
        self.explained = explained

    @property
    def accepted(self) -> bool:
        return self.status in ACCEPTED

    @property
    def device(self) -> Any:
        return self.batch.device if self.batch is not None else None

    def __repr__(self) -> str:
        return "<Verdict %s %s>" % (self.status, self.reason)


class BatchVerifier:
    """Verifies signed batches against a keyring and classifies them per device chain.

    ``keyring``: mapping kid (bytes) -> ``KeyEntry``. ``states``: mapping device id ->
    ``ChainState`` (a dict by default; the fleet passes a database-backed mapping).
    ``decode``: the CBOR decoder for the payload, ``envelope_decode(data, max_bytes)`` the
    one for the COSE envelope, or ``sign1_decode(data)`` a whole ``cose.decode_sign1``
    stand-in (the core's by default; CPython passes C-backed or byte-layout decoders that
    the differential tests hold to the core's: see ``host/cityedge_host/verify.py``).
    """

    def __init__(
        self,
        keyring: Any,
        states: Any = None,
        decode: Any = None,
        envelope_decode: Any = None,
        sign1_decode: Any = None,
    ) -> None:
        self.keyring = keyring
        self.states = states if states is not None else {}
        self.decode = decode if decode is not None else cbor.loads
        self.envelope_decode = envelope_decode
        self.sign1_decode = sign1_decode

    def envelope(self, data: Any) -> Any:
        """The COSE_Sign1 envelope of ``data`` (its ``kid`` names the signing key); raises
        ``MalformedError``. Nothing of the payload is decoded."""
        if self.sign1_decode is not None:
            return self.sign1_decode(data)
        return cose.decode_sign1(data, loads=self.envelope_decode)

    def verify_with(self, msg: Any, entry: Any, data: Any) -> Any:
        """Signature by ``entry``'s key, then the payload, then payload device = key's
        device; returns ``(batch, digest)``. Raises ``SignatureError`` or
        ``MalformedError``."""
        msg.verify(entry.verifier)
        try:
            obj = self.decode(msg.payload)
        except PeerError:
            raise
        except Exception as e:  # a foreign decoder's own error type
            raise MalformedError("batch payload: %s" % e) from e
        batch = Batch.from_map(obj)
        if batch.device != entry.device:
            raise SignatureError(
                "batch names device %s but is signed by %s's key" % (batch.device, entry.device)
            )
        return batch, batchmod.batch_hash(bytes(data))

    def open(self, data: Any) -> Any:
        """Envelope, key, signature and payload checks; returns (batch, digest, kid).

        Raises ``MalformedError``, ``UnknownKeyError`` or ``SignatureError``. A receiver
        with rules of its own about who may sign (the fleet's ``acceptance``) calls the
        steps itself: ``envelope``, its key lookup and rules, ``verify_with``, ``place``.
        """
        msg = self.envelope(data)
        kid = msg.kid
        entry = self.keyring.get(kid) if kid is not None else None
        if entry is None or entry.revoked:
            raise UnknownKeyError("key %s is not trusted" % (kid.hex() if kid else "(none)"))
        batch, digest = self.verify_with(msg, entry, data)
        return batch, digest, kid

    def check(self, data: Any) -> Verdict:
        """Verify and classify one batch; never raises for bad input."""
        try:
            batch, digest, kid = self.open(data)
        except UnknownKeyError as e:
            return Verdict(UNKNOWN_KEY, str(e))
        except SignatureError as e:
            return Verdict(BAD_SIGNATURE, str(e))
        except MalformedError as e:
            return Verdict(MALFORMED, str(e))
        return self.place(batch, digest, kid)

    def place(self, batch: Any, digest: bytes, kid: Any = None) -> Verdict:
        """Classify an opened batch on its device's chain (the state moves)."""
        state = self.states.get(batch.device)
        if state is None:
            state = ChainState()
        status, missing = state.classify(batch.seq, batch.prev, digest)
        explained = 0
        if status in ACCEPTED and batch.kind == batchmod.KIND_DROP:
            explained = state.explain_drop(batch.dropped[0], batch.dropped[1])
        self.states[batch.device] = state
        return Verdict(status, "", batch, digest, missing, kid, explained)
