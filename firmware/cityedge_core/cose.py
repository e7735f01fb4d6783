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

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: Any) -> Any:
        return x


from . import cbor
from .errors import LimitError, MalformedError, text

# limits (``limits``) as private consts: the compiler folds them, and the device
# never loads ``limits`` (its names would be interned: "Memory on the device");
# tests/core/test_limit_copies.py holds them equal to ``limits``
_BATCH_MAX_BYTES = const(16384)
_KID_MAX_BYTES = const(64)
# The messages this module raises, one string constant (``errors.text``): on a device each
# string constant over 10 characters is an object of its own on the heap
_TEXTS = const("COSE: message of %d bytes, limit %d|"
               "COSE: not a tagged COSE_Sign1 of four items|"
               "COSE: unprotected parameters are not accepted here|"
               "COSE: message is truncated|COSE: bytes after the message|"
               "COSE: protected header is not {alg: ES256, kid}|"
               "COSE: signature is not 64 bytes|"
               "COSE: expected a byte string of definite length|"
               "COSE: byte string head is not in its shortest form|"
               "kid must be bytes of at most %d")
_M_LARGE = const(0)
_M_SHAPE = const(1)
_M_UNPROTECTED = const(2)
_M_TRUNCATED = const(3)
_M_TRAILING = const(4)
_M_PROTECTED = const(5)
_M_SIG = const(6)
_M_BSTR = const(7)
_M_SHORTEST = const(8)
_M_KID = const(9)

COSE_SIGN1_TAG = 18
ALG_ES256 = -7
HDR_ALG = 1
HDR_CRIT = 2
HDR_CONTENT_TYPE = 3
HDR_KID = 4
SIGNATURE_BYTES = 64
_UNDERSTOOD = (HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID)


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


# (a private const must come before its first use: the compiler folds it from there)
_PROTECTED_ES256 = const(b"\xa2\x01\x26\x04")  # map(2): alg (1) = ES256 (-7), kid (4) = ...


def split_sign1(data: Any, max_bytes: int = _BATCH_MAX_BYTES) -> Any:
    """``(kid, protected_raw, payload, signature)`` of a COSE_Sign1 in exactly the form
    ``encode_sign1`` writes: tag 18, four items with shortest heads, the protected header
    ``{alg: ES256, kid: 1..23 bytes}``, no unprotected parameters, a 64-byte signature.

    A device's way to read fleet commands and its own stored batches: slices, no decoder
    on its heap, and nothing parsed beyond this fixed shape before the caller checks the
    signature. Anything else, valid COSE included, is ``MalformedError`` (``decode_sign1``
    reads every form the rules above allow).
    """
    if len(data) > max_bytes:
        raise LimitError(text(_TEXTS, _M_LARGE, (len(data), max_bytes)))
    try:
        if data[0] != 0xD2 or data[1] != 0x84:
            raise MalformedError(text(_TEXTS, _M_SHAPE))
        protected, pos = _bstr_at(data, 2)
        if data[pos] != 0xA0:
            raise MalformedError(text(_TEXTS, _M_UNPROTECTED))
        payload, pos = _bstr_at(data, pos + 1)
        sig, pos = _bstr_at(data, pos)
    except IndexError:
        raise MalformedError(text(_TEXTS, _M_TRUNCATED)) from None
    if pos != len(data):
        raise MalformedError(text(_TEXTS, _M_TRAILING))
    n = len(protected) - 5
    if not 0 < n < 24 or protected[:4] != _PROTECTED_ES256 or protected[4] != 0x40 | n:
        raise MalformedError(text(_TEXTS, _M_PROTECTED))
    if len(sig) != SIGNATURE_BYTES:
        raise MalformedError(text(_TEXTS, _M_SIG))
    return protected[5:], protected, payload, sig




def _bstr_at(data: Any, pos: int) -> Any:
    """The byte string whose head (shortest form, at most 65535 bytes) is at ``pos``, and
    the position after it; IndexError when the data ends first."""
    ib = data[pos]
    n = ib & 31
    if ib >> 5 != 2 or n > 25:
        raise MalformedError(text(_TEXTS, _M_BSTR))
    pos += 1
    if n == 24:
        n = data[pos]
        pos += 1
        short = n < 24
    elif n == 25:
        n = (data[pos] << 8) | data[pos + 1]
        pos += 2
        short = n < 256
    else:
        short = False
    if short:
        raise MalformedError(text(_TEXTS, _M_SHORTEST))
    end = pos + n
    if end > len(data):
        raise IndexError
    return bytes(data[pos:end]), end


def encode_sign1(payload: bytes, signer: Any, kid: bytes, external_aad: bytes = b"") -> bytes:
    """Sign ``payload`` and return the tagged COSE_Sign1 bytes (alg and kid protected)."""
    return encode_sign1_parts((payload,), signer, kid, external_aad)


def encode_sign1_parts(parts: Any, signer: Any, kid: bytes, external_aad: bytes = b"") -> bytes:
    """``encode_sign1`` for a payload given as consecutive chunks (bytes-like)."""
    return join_chunks(sign1_chunks(parts, signer, kid, external_aad))


def join_chunks(chunks: Any) -> bytes:
    """Bytes-like chunks as one ``bytes`` (MicroPython's ``bytes.join`` refuses a
    memoryview: those are copied first). One allocation of the result's size: a
    ``bytearray`` grown an ``extend`` at a time and then copied needed two or three
    blocks of about that size in one piece (in a cut-up 64 KiB heap, the joined batch's
    877 bytes found none: ``tests/core/test_interop.py``)."""
    return b"".join([chunk if isinstance(chunk, bytes) else bytes(chunk) for chunk in chunks])


def sign1_chunks(parts: Any, signer: Any, kid: bytes, external_aad: bytes = b"") -> Any:
    """The tagged COSE_Sign1 of a payload given as consecutive chunks, as a tuple of
    chunks: the envelope's own pieces around the payload's, which are not copied.

    The device's path: neither the payload nor the envelope is ever joined into one
    object (the ring buffer writes the chunks one after the other). A signer with
    ``sign_digest`` (the pure-Python key) gets SHA-256 fed chunk by chunk, so the
    Sig_structure is never built either; any other signer gets its bytes.
    """
    if not isinstance(kid, bytes) or len(kid) > _KID_MAX_BYTES:
        raise ValueError(text(_TEXTS, _M_KID, (_KID_MAX_BYTES,)))
    protected_raw = cbor.dumps({HDR_ALG: ALG_ES256, HDR_KID: kid})
    size = 0
    for part in parts:
        size += len(part)
    prot_head = _bstr_head(len(protected_raw))
    payload_head = _bstr_head(size)
    sign_digest = getattr(signer, "sign_digest", None)
    if sign_digest is not None:
        import hashlib

        h = hashlib.sha256(b"\x84\x6aSignature1")
        for piece in (prot_head, protected_raw, _bstr_head(len(external_aad)), external_aad,
                      payload_head):
            h.update(piece)
        for part in parts:
            h.update(part)
        digest = h.digest()
        del h  # not alive through the signature, the heap peak on a device
        sig = sign_digest(digest)
    else:
        sig = signer.sign(sig_structure(protected_raw, join_chunks(parts), external_aad))
    if len(sig) != SIGNATURE_BYTES:
        raise ValueError("signer must return 64-byte r || s")
    # tag 18, array of 4: protected bstr, empty unprotected map, payload bstr, bstr(64)
    return ((b"\xd2\x84" + prot_head + protected_raw + b"\xa0" + payload_head,)
            + tuple(parts) + (b"\x58\x40" + sig,))


def decode_sign1(data: Any, allow_untagged: bool = False, max_bytes: int = _BATCH_MAX_BYTES,
                 loads: Any = None) -> Any:
    """Decode and check a COSE_Sign1 message; returns a ``cose_decode.Sign1``.

    The decoding half lives in ``cose_decode`` and is loaded on first use, so a device
    that only signs does not carry it. Rules: this module's docstring.
    """
    from . import cose_decode  # on first use (above)

    return cose_decode.decode_sign1(data, allow_untagged, max_bytes, loads)


def sign1_from_array(obj: Any, loads: Any = None) -> Any:
    """Check an already decoded COSE_Sign1 array; returns a ``cose_decode.Sign1``."""
    from . import cose_decode  # on first use, as in ``decode_sign1``

    return cose_decode.sign1_from_array(obj, loads)


def kid_for_public_key(sec1_point: bytes) -> bytes:
    """cityedge key id: the first 8 bytes of SHA-256 over the uncompressed SEC1 point.

    Both interpreters compute it the same way, so device, gateway and fleet agree on the kid
    of a key without a registry lookup.
    """
    import hashlib

    return hashlib.sha256(sec1_point).digest()[:8]
