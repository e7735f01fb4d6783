"""The decoding half of ``rotation``: a device's ``up/csr`` message, read by the fleet.

Protocol: ``rotation``'s docstring. Split from it so a device, which only writes the
message, does not carry this class on its heap. ``decode_csr_message`` is rule 1 of the
fleet's checks (size and shape); the signature (``CsrMessage.verify``, with the key the
proof's kid names) and the CSR's own checks are the fleet's later rules. Shape, in order
(the first failure refuses):

1. at most ``CSR_MESSAGE_MAX_BYTES``; one CBOR map with exactly the keys 1 (``csr``: bytes,
   1..``CSR_MAX_BYTES``) and 2 (``proof``: bytes, at most ``ROTATION_PROOF_MAX_BYTES``);
2. the proof is a COSE_Sign1 (``cose.decode_sign1``) with a kid;
3. its payload is a map with exactly the keys 1 (device: a device URN,
   ``batch.check_device_id``), 2 (rotation id: 1..``ROTATION_ID_MAX``) and 3 (32 bytes).

Anything else is a ``MalformedError`` (``LimitError`` for a size) naming the field. No
unknown keys are kept: this message has one purpose and one version (its AAD).
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

import hashlib

from . import cbor, cose, limits
from .batch import check_device_id
from .errors import LimitError, MalformedError
from .rotation import M_CSR, M_PROOF, P_CSR_SHA256, P_DEVICE, P_ROTATION, PROOF_AAD


class CsrMessage:
    """A decoded ``up/csr`` message whose proof is not verified yet."""

    def __init__(self, csr: bytes, proof: Any, device: str, rotation_id: int,
                 csr_sha256: bytes) -> None:
        self.csr = csr  # DER
        self.proof = proof  # cose_decode.Sign1
        self.kid = bytes(proof.kid)
        self.device = device
        self.rotation_id = rotation_id
        self.csr_sha256 = csr_sha256

    def verify(self, verifier: Any) -> None:
        """SignatureError unless ``verifier`` (the key the kid names) signed the proof."""
        self.proof.verify(verifier, PROOF_AAD)

    def digest_matches(self) -> bool:
        """The proof names this CSR: its hash is the CSR's SHA-256."""
        return hashlib.sha256(self.csr).digest() == self.csr_sha256

    def __repr__(self) -> str:
        return "CsrMessage(%s, rotation %d, kid %s)" % (self.device, self.rotation_id,
                                                         self.kid.hex())


def _exact_map(obj: Any, keys: Any, what: str) -> None:
    if not isinstance(obj, dict):
        raise MalformedError("%s is not a map" % what)
    for key in obj:
        if key not in keys or isinstance(key, bool):
            raise MalformedError("%s has a key it must not have" % what)
    for key in keys:
        if key not in obj:
            raise MalformedError("%s lacks key %d" % (what, key))


def decode_csr_message(data: Any) -> CsrMessage:
    """Rules 1-3 above."""
    if len(data) > limits.CSR_MESSAGE_MAX_BYTES:
        raise LimitError("csr message: %d bytes, limit %d"
                         % (len(data), limits.CSR_MESSAGE_MAX_BYTES))
    obj = cbor.loads(data, max_bytes=limits.CSR_MESSAGE_MAX_BYTES, max_items=16,
                     max_depth=2)
    _exact_map(obj, (M_CSR, M_PROOF), "csr message")
    csr = obj[M_CSR]
    proof = obj[M_PROOF]
    if not isinstance(csr, bytes) or not csr:
        raise MalformedError("csr message: the CSR (1) must be bytes")
    if len(csr) > limits.CSR_MAX_BYTES:
        raise LimitError("csr message: CSR over %d bytes" % limits.CSR_MAX_BYTES)
    if not isinstance(proof, bytes):
        raise MalformedError("csr message: the proof (2) must be bytes")
    msg = cose.decode_sign1(proof, max_bytes=limits.ROTATION_PROOF_MAX_BYTES)
    if not isinstance(msg.kid, bytes) or not msg.kid:
        raise MalformedError("csr message: the proof names no key (kid)")
    claims = cbor.loads(msg.payload, max_bytes=limits.ROTATION_PROOF_MAX_BYTES,
                        max_items=8, max_depth=1)
    _exact_map(claims, (P_DEVICE, P_ROTATION, P_CSR_SHA256), "csr proof")
    device = claims[P_DEVICE]
    check_device_id(device)
    rid = claims[P_ROTATION]
    if not isinstance(rid, int) or isinstance(rid, bool) or \
            not 0 < rid <= limits.ROTATION_ID_MAX:
        raise MalformedError("csr proof: the rotation id (2) must be in 1..%d"
                             % limits.ROTATION_ID_MAX)
    digest = claims[P_CSR_SHA256]
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise MalformedError("csr proof: the CSR hash (3) must be 32 bytes")
    return CsrMessage(csr, msg, device, rid, digest)
