"""The decoding half of ``cose``: ``Sign1`` and the checks ``decode_sign1`` applies.

Loaded on first use through ``cose.decode_sign1`` (a signing-only device never loads it).
The rules are listed in ``cose``'s module docstring.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: Any) -> Any:
        return x


from . import cbor
from .cose import (
    _UNDERSTOOD,
    ALG_ES256,
    COSE_SIGN1_TAG,
    HDR_ALG,
    HDR_CRIT,
    HDR_KID,
    SIGNATURE_BYTES,
    sig_structure,
)
from .errors import MalformedError, SignatureError

# limits (``limits``) as private consts, as ``cose`` keeps them: a device that decodes a
# COSE_Sign1 (an update's manifest) never loads ``limits`` and its names;
# tests/core/test_limit_copies.py holds them equal
_BATCH_MAX_BYTES = const(16384)
_KID_MAX_BYTES = const(64)


class Sign1:
    """A decoded, not yet verified, COSE_Sign1 message."""

    def __init__(
        self,
        protected_raw: bytes,
        protected: Any,
        unprotected: Any,
        payload: bytes,
        sig: bytes,
        tbs: Any = None,
    ) -> None:
        self.protected_raw = protected_raw
        self.protected = protected
        self.unprotected = unprotected
        self.payload = payload
        self.signature = sig
        # the Sig_structure without external_aad when a decoder already has its bytes
        # (CPython slices it from the message); None: built on demand
        self._tbs = tbs

    @property
    def kid(self) -> Any:
        """The key id, protected bucket first (cityedge always protects it)."""
        kid = self.protected.get(HDR_KID)
        if kid is None:
            kid = self.unprotected.get(HDR_KID)
        return kid

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        if self._tbs is not None and not external_aad:
            return self._tbs  # type: ignore[no-any-return]
        return sig_structure(self.protected_raw, self.payload, external_aad)

    def verify(self, verifier: Any, external_aad: bytes = b"") -> None:
        """Raise ``SignatureError`` unless the signature verifies with ``verifier``."""
        if not verifier.verify(self.to_be_signed(external_aad), self.signature):
            raise SignatureError("COSE_Sign1: signature does not verify")


def decode_sign1(
    data: Any,
    allow_untagged: bool = False,
    max_bytes: int = _BATCH_MAX_BYTES,
    loads: Any = None,
) -> Sign1:
    """Decode and structurally check a COSE_Sign1 message (rules in the module doc).

    ``loads(data, max_bytes)`` may replace the core decoder (CPython passes a C-backed one
    held to the same rules); a tag is then any object with ``tag`` and ``value``.
    """
    if loads is None:
        obj = cbor.loads(data, max_bytes=max_bytes, max_items=64, max_depth=4)
    else:
        obj = loads(data, max_bytes)
    if not isinstance(obj, list):
        tag = getattr(obj, "tag", None)
        if tag is None:
            raise MalformedError("COSE: message is not a COSE_Sign1 array")
        if tag != COSE_SIGN1_TAG:
            raise MalformedError("COSE: tag %d is not COSE_Sign1 (18)" % tag)
        obj = obj.value
    elif not allow_untagged:
        raise MalformedError("COSE: message is not tagged COSE_Sign1 (18)")
    return sign1_from_array(obj, loads)


# CPython's fast path only (``loads`` given): protected bytes -> their checked map. A
# device signs every batch under the same protected header, so ingest parses it once.
_PROTECTED_CACHE: dict[bytes, Any] = {}
_PROTECTED_CACHE_MAX = 4096  # entries; cleared when full


def _checked_protected(protected_raw: bytes, loads: Any) -> Any:
    """The protected header as a map, with the rules that depend on it alone applied
    (a map; alg ES256; crit understood). The result is shared: treat it as read-only.

    Always decoded by the core decoder (its limits: 32 items, depth 2), so both paths judge
    a protected header alike; ``loads`` given (CPython) only turns the cache on.
    """
    if loads is not None:
        hit = _PROTECTED_CACHE.get(protected_raw)
        if hit is not None:
            return hit
    if protected_raw:
        protected = cbor.loads(protected_raw, max_items=32, max_depth=2)
        if not isinstance(protected, dict):
            raise MalformedError("COSE: protected header is not a map")
    else:
        protected = {}
    if protected.get(HDR_ALG) != ALG_ES256:
        if HDR_ALG not in protected:
            raise MalformedError("COSE: alg must be in the protected header")
        raise MalformedError("COSE: unsupported alg %r (only ES256)" % (protected[HDR_ALG],))
    crit = protected.get(HDR_CRIT)
    if crit is not None:
        if not isinstance(crit, list) or not crit:
            raise MalformedError("COSE: crit must be a non-empty array")
        for label in crit:
            if label not in _UNDERSTOOD:
                raise MalformedError("COSE: critical header %r not understood" % (label,))
    if loads is not None:
        if len(_PROTECTED_CACHE) >= _PROTECTED_CACHE_MAX:
            _PROTECTED_CACHE.clear()
        _PROTECTED_CACHE[protected_raw] = protected
    return protected


def sign1_from_array(obj: Any, loads: Any = None, tbs: Any = None) -> Sign1:
    """Check the four-element COSE_Sign1 array (already decoded) and return a ``Sign1``.

    ``tbs``: the Sig_structure bytes (no external_aad) when the caller has them already;
    they must equal ``sig_structure(protected, payload)``.
    """
    if not isinstance(obj, list) or len(obj) != 4:
        raise MalformedError("COSE: COSE_Sign1 must be an array of four items")
    protected_raw, unprotected, payload, sig = obj
    if not isinstance(protected_raw, bytes):
        raise MalformedError("COSE: protected header must be a byte string")
    if not isinstance(unprotected, dict):
        raise MalformedError("COSE: unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise MalformedError("COSE: payload must be a byte string (no detached payloads)")
    if not isinstance(sig, bytes):
        raise MalformedError("COSE: signature must be a byte string")
    protected = _checked_protected(protected_raw, loads)
    for label in unprotected:
        if label in protected:
            raise MalformedError("COSE: header label %r in both buckets" % (label,))
    kid = protected.get(HDR_KID, unprotected.get(HDR_KID))
    if kid is not None and (not isinstance(kid, bytes) or len(kid) > _KID_MAX_BYTES):
        raise MalformedError("COSE: kid must be a byte string of at most 64 bytes")
    if len(sig) != SIGNATURE_BYTES:
        raise SignatureError("COSE: ES256 signature must be 64 bytes, got %d" % len(sig))
    return Sign1(protected_raw, protected, unprotected, payload, sig, tbs)
