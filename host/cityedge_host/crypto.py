"""ES256 on CPython via ``cryptography`` (OpenSSL), in the shape the shared core expects.

The core's COSE code calls ``signer.sign(message) -> r || s`` and
``verifier.verify(message, signature) -> bool``; these classes adapt OpenSSL's DER-based
ECDSA API to that raw P1363 form.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cityedge_core.cose import kid_for_public_key
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_N_BYTES = _N.to_bytes(32, "big")
_ZERO32 = bytes(32)


def _der_integer(v: bytes) -> bytes:
    """A DER INTEGER for a positive 32-byte big-endian value (minimal, sign byte if needed)."""
    v = v.lstrip(b"\x00")
    if v[0] & 0x80:
        return b"\x02" + bytes((len(v) + 1,)) + b"\x00" + v
    return b"\x02" + bytes((len(v),)) + v


def _der_signature(r: bytes, s: bytes) -> bytes:
    """ECDSA-Sig-Value (RFC 3279) from r and s: what ``encode_dss_signature`` returns."""
    body = _der_integer(r) + _der_integer(s)
    return b"\x30" + bytes((len(body),)) + body


class KeyFileError(UserError, ValueError):
    """A key or certificate file is missing, unreadable or of the wrong kind."""


def public_sec1(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


class EcVerifier:
    """Verifies ES256 r || s signatures with a P-256 public key."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey) -> None:
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise KeyFileError("ES256 needs a P-256 key, got %s" % public_key.curve.name)
        self.public_key = public_key
        self.kid = kid_for_public_key(public_sec1(public_key))

    @classmethod
    def from_sec1(cls, point: bytes) -> EcVerifier:
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError as e:
            raise KeyFileError("invalid P-256 point: %s" % e) from e
        return cls(key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        r = signature[:32]
        s = signature[32:]
        # 0 < r, s < n, compared as 32-byte big-endian strings (no int round trip)
        if not (_ZERO32 < r < _N_BYTES and _ZERO32 < s < _N_BYTES):
            return False
        try:
            self.public_key.verify(_der_signature(r, s), message, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True


class EcSigner:
    """Signs with a P-256 private key, returning r || s. The key is never printed."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise KeyFileError("ES256 needs a P-256 key, got %s" % private_key.curve.name)
        self._key = private_key
        self.public_key = private_key.public_key()
        self.kid = kid_for_public_key(public_sec1(self.public_key))

    @classmethod
    def generate(cls) -> EcSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def sign(self, message: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(message, _ECDSA_SHA256))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def verifier(self) -> EcVerifier:
        return EcVerifier(self.public_key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, mode 0600, atomically (temp file + rename)."""
        write_atomic(path, self.private_pem(), 0o600)

    def __repr__(self) -> str:
        return "<EcSigner kid=%s>" % self.kid.hex()


def load_signer(path: Path) -> EcSigner:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise KeyFileError("cannot read key %s: %s" % (path, e.strerror)) from e
    except (ValueError, TypeError) as e:
        raise KeyFileError("%s is not an unencrypted PEM private key" % path) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError("%s is not an EC private key" % path)
    return EcSigner(key)


def load_verifier(path: Path) -> EcVerifier:
    """A verifier from a PEM certificate, a PEM/DER public key, or a bare P-256 point: the
    65 bytes of SEC1 (the device's ``fleet0.pub``) or their 130 hex digits (what the
    fleet's ``GET /ca/fleet-keys`` lists)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError("cannot read %s: %s" % (path, e.strerror)) from e
    text = data.strip()
    if len(text) == 130 and all(c in b"0123456789abcdefABCDEF" for c in text):
        data = bytes.fromhex(text.decode())
    if len(data) == 65 and data[0] == 4:
        return EcVerifier.from_sec1(data)
    key: object
    try:
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        elif b"PUBLIC KEY" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except ValueError as e:
        raise KeyFileError("%s is not a PEM certificate or public key" % path) from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError("%s does not hold an EC public key" % path)
    return EcVerifier(key)
