"""COSE_Sign1 (RFC 9052 §4.2) with ES256 (RFC 9053 §2.1): the envelope of every signed
message cityedge sends (reading batches, status, drop records, fleet commands).

The signature primitive is injected, so this code is shared by both interpreters:

- a *signer* has ``sign(message: bytes) -> bytes`` returning r || s (64 bytes);
- a *verifier* has ``verify(message: bytes, signature: bytes) -> bool``.

``p256.PrivateKey``/``p256.PublicKey`` are such objects on MicroPython; on CPython the
host package wraps ``cryptography``.

Rules applied by ``decode_sign1`` (the one place that accepts or rejects an envelope):

1. The message is tag 18 (COSE_Sign1_Tagged). An untagged array is accepted only when the
   caller passes ``allow_untagged=True`` (RFC 9052 §2: the tag may be left out where the
   application already knows the type). Any other tag is refused.
2. It is an array of exactly four items: protected (bstr), unprotected (map), payload
   (bstr; detached payloads are not used here), signature (bstr).
3. The protected bucket is a bstr holding a CBOR map; it must carry ``alg`` (label 1) and
   ``alg`` must be ES256 (-7). ``alg`` in the unprotected bucket alone is refused, so an
   attacker cannot swap the algorithm (RFC 9052 §3.1 recommends protecting it).
4. A ``crit`` parameter (label 2) naming a label we do not process is refused (§3.1).
5. The Sig_structure is rebuilt from the protected bytes *as received* (§4.4). Hence the
   Examples repository's ``sign-pass-01`` (protected ``h'A0'`` but signed over ``h''``) is
   rejected: it would need a verifier that re-encodes what it received.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, limits
from .errors import MalformedError, SignatureError

COSE_SIGN1_TAG = 18
ALG_ES256 = -7
HDR_ALG = 1
HDR_CRIT = 2
HDR_CONTENT_TYPE = 3
HDR_KID = 4
SIGNATURE_BYTES = 64
_UNDERSTOOD = (HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID)


class Sign1:
    """A decoded, not yet verified, COSE_Sign1 message."""

    def __init__(
        self, protected_raw: bytes, protected: Any, unprotected: Any, payload: bytes, sig: bytes
    ) -> None:
        self.protected_raw = protected_raw
        self.protected = protected
        self.unprotected = unprotected
        self.payload = payload
        self.signature = sig

    @property
    def kid(self) -> Any:
        """The key id, protected bucket first (cityedge always protects it)."""
        kid = self.protected.get(HDR_KID)
        if kid is None:
            kid = self.unprotected.get(HDR_KID)
        return kid

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        return sig_structure(self.protected_raw, self.payload, external_aad)

    def verify(self, verifier: Any, external_aad: bytes = b"") -> None:
        """Raise ``SignatureError`` unless the signature verifies with ``verifier``."""
        if not verifier.verify(self.to_be_signed(external_aad), self.signature):
            raise SignatureError("COSE_Sign1: signature does not verify")


def _bstr_head(n: int) -> bytes:
    out = bytearray()
    cbor.encode_head(out, 2, n)
    return bytes(out)


def sig_structure(protected_raw: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The bytes ES256 signs: ["Signature1", protected, external_aad, payload] (§4.4).

    Built with one ``join`` (one allocation of the final size): on a 64 KiB heap a growing
    buffer fragments memory.
    """
    return b"".join((
        b"\x84\x6aSignature1",
        _bstr_head(len(protected_raw)), protected_raw,
        _bstr_head(len(external_aad)), external_aad,
        _bstr_head(len(payload)), payload,
    ))


def encode_sign1(payload: bytes, signer: Any, kid: bytes, external_aad: bytes = b"") -> bytes:
    """Sign ``payload`` and return the tagged COSE_Sign1 bytes (alg and kid protected)."""
    if not isinstance(kid, bytes) or len(kid) > limits.KID_MAX_BYTES:
        raise ValueError("kid must be bytes of at most %d" % limits.KID_MAX_BYTES)
    protected_raw = cbor.dumps({HDR_ALG: ALG_ES256, HDR_KID: kid})
    sig = signer.sign(sig_structure(protected_raw, payload, external_aad))
    if len(sig) != SIGNATURE_BYTES:
        raise ValueError("signer must return 64-byte r || s")
    return b"".join((
        b"\xd2\x84",  # tag 18, array of 4
        _bstr_head(len(protected_raw)), protected_raw,
        b"\xa0",  # empty unprotected map
        _bstr_head(len(payload)), payload,
        _bstr_head(len(sig)), sig,
    ))


def decode_sign1(
    data: Any,
    allow_untagged: bool = False,
    max_bytes: int = limits.BATCH_MAX_BYTES,
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
    return sign1_from_array(obj)


def sign1_from_array(obj: Any) -> Sign1:
    """Check the four-element COSE_Sign1 array (already decoded) and return a ``Sign1``."""
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
    for bucket in (protected, unprotected):
        for label in bucket:
            if label in protected and bucket is unprotected:
                raise MalformedError("COSE: header label %r in both buckets" % (label,))
    crit = protected.get(HDR_CRIT)
    if crit is not None:
        if not isinstance(crit, list) or not crit:
            raise MalformedError("COSE: crit must be a non-empty array")
        for label in crit:
            if label not in _UNDERSTOOD:
                raise MalformedError("COSE: critical header %r not understood" % (label,))
    kid = protected.get(HDR_KID, unprotected.get(HDR_KID))
    if kid is not None and (not isinstance(kid, bytes) or len(kid) > limits.KID_MAX_BYTES):
        raise MalformedError("COSE: kid must be a byte string of at most 64 bytes")
    if len(sig) != SIGNATURE_BYTES:
        raise SignatureError("COSE: ES256 signature must be 64 bytes, got %d" % len(sig))
    return Sign1(protected_raw, protected, unprotected, payload, sig)


def kid_for_public_key(sec1_point: bytes) -> bytes:
    """cityedge key id: the first 8 bytes of SHA-256 over the uncompressed SEC1 point.

    Both interpreters compute it the same way, so device, gateway and fleet agree on the kid
    of a key without a registry lookup.
    """
    import hashlib

    return hashlib.sha256(sec1_point).digest()[:8]
