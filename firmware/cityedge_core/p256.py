"""Pure-Python ECDSA on NIST P-256 (secp256r1) with SHA-256, for boards without a
public-key API (MicroPython has none).

- Signing uses RFC 6979 deterministic nonces (HMAC-SHA256 DRBG, §3.2), so a signature never
  depends on the board's RNG at signing time; the RNG is only needed once, to make the key.
- Signatures are IEEE P1363 ``r || s`` (32 + 32 bytes), the form COSE ES256 uses
  (RFC 9053 §2.1).
- Public keys are SEC1 uncompressed points (``04 || X || Y``); ``PublicKey.from_sec1``
  validates them (coordinates in range, point on the curve, not the point at infinity;
  SEC1 v2 §3.2.2.1), so an invalid-curve point is refused before any arithmetic.
- Verification rejects r or s outside [1, n-1] (FIPS 186-5 §6.4.2).

Arithmetic is in Jacobian coordinates with the a = -3 doubling formula and mixed
(Jacobian + affine) addition; verification uses Shamir's trick one bit at a time (a table
of three affine points: small heap). Not constant
time: acceptable for verification, and for signing on a device whose only observer is the
holder of the device.

Measured on the MicroPython unix port (x86-64): one sign about 0.1 s, one verify about
0.15 s; a sign fits under ``-X heapsize=32k``.
"""

import hashlib

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from .errors import SignatureError

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5

_INF = (1, 1, 0)  # Jacobian point at infinity: Z == 0


def _double(pt: Any) -> Any:
    x1, y1, z1 = pt
    if z1 == 0 or y1 == 0:
        return _INF
    p = P
    # in the order that lets each value go as soon as it is used (the signature's heap
    # peak is in here): delta and gamma are dead before beta's products are made
    delta = z1 * z1 % p
    gamma = y1 * y1 % p
    z3 = ((y1 + z1) * (y1 + z1) - gamma - delta) % p
    alpha = 3 * (x1 - delta) * (x1 + delta) % p
    delta = x1 * gamma % p  # beta
    gamma = gamma * gamma % p
    x3 = (alpha * alpha - 8 * delta) % p
    return (x3, (alpha * (4 * delta - x3) - 8 * gamma) % p, z3)


def _affine_x(pt: Any) -> int:
    """The affine x of a Jacobian point (all a signature needs): no product over 512
    bits (a 768-bit one is a 98-byte allocation, at the signature's heap peak)."""
    zinv = pow(pt[2], P - 2, P)
    zinv = zinv * zinv % P
    x: int = pt[0] * zinv % P
    return x


def _to_affine(pt: Any) -> Any:
    zinv = pow(pt[2], P - 2, P)
    zinv2 = zinv * zinv % P
    return (pt[0] * zinv2 % P, pt[1] * zinv2 * zinv % P)


def _add_affine(p1: Any, x2: int, y2: int) -> Any:
    """p1 (Jacobian) + (x2, y2) (affine: Z = 1), the only addition both signing and
    verifying need: fewer products than a Jacobian + Jacobian one and fewer big integers
    alive at once (the heap peak of both is in here), none over 512 bits."""
    x1, y1, z1 = p1
    if z1 == 0:
        return (x2, y2, 1)
    p = P
    zz = z1 * z1 % p
    h = (x2 * zz - x1) % p  # U2 - X1
    r = (y2 * (z1 * zz % p) - y1) % p  # S2 - Y1; no product over 512 bits
    if h == 0:
        if r == 0:
            return _double(p1)
        return _INF
    zz = h * h % p  # HH
    v = x1 * zz % p  # V = X1 * HH
    zz = h * zz % p  # HHH
    x3 = (r * r - zz - 2 * v) % p
    return (x3, (r * (v - x3) - y1 * zz) % p, z1 * h % p)


def _mul(k: int, x: int, y: int) -> Any:
    """k * (x, y) (an affine point) by double-and-add, one bit at a time, no table.

    Windows buy little here and their tables cost heap at the device's peak (signing):
    a 4-bit window (16 points) needed 28 KB of heap per signature, a 2-bit one (3 points)
    about 1.5 KB more free heap than this, for 5 % less time (MicroPython unix port).
    """
    acc = _INF
    bits = k.to_bytes(32, "big")  # bits read from bytes: no 256-bit ``k >> i`` per step
    for shift in range(256):
        acc = _double(acc)
        if (bits[shift >> 3] << (shift & 7)) & 0x80:
            acc = _add_affine(acc, x, y)
    return acc


def _mul_add(u1: int, x1: int, y1: int, u2: int, x2: int, y2: int) -> Any:
    """u1 * (x1, y1) + u2 * (x2, y2) (affine points) by Shamir's trick, one bit of each
    scalar per step. Its table is the two points and their sum, all affine (the sum is
    None when it is the point at infinity), so every addition is ``_add_affine``."""
    both = _add_affine((x1, y1, 1), x2, y2)
    both = _to_affine(both) if both[2] else None
    acc = _INF
    for shift in range(255, -1, -1):
        acc = _double(acc)
        w = (((u1 >> shift) & 1) << 1) | ((u2 >> shift) & 1)
        if w == 1:
            acc = _add_affine(acc, x2, y2)
        elif w == 2:
            acc = _add_affine(acc, x1, y1)
        elif w == 3 and both is not None:
            acc = _add_affine(acc, both[0], both[1])
    return acc


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    # RFC 2104; written out because MicroPython ships no hmac module.
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key + bytes(64 - len(key))
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    inner.update(message)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    outer.update(inner.digest())
    return outer.digest()


def _int32(x: int) -> bytes:
    return x.to_bytes(32, "big")


def _nth_nonce(d: int, digest: bytes, i: int) -> int:
    """Candidate ``i`` (from 0) of ``rfc6979_nonces``; the generator is let go."""
    for k in rfc6979_nonces(d, digest):
        if i == 0:
            nonce: int = k
            return nonce
        i -= 1
    raise AssertionError("unreachable")


def rfc6979_nonces(d: int, digest: bytes) -> Any:
    """Generate RFC 6979 §3.2 nonce candidates in order (qlen = hlen = 256 bits)."""
    h = int.from_bytes(digest, "big") % N  # bits2octets: bits2int, then reduce mod q
    x_oct = _int32(d)
    h_oct = _int32(h)
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = _hmac_sha256(k, v + b"\x00" + x_oct + h_oct)
    v = _hmac_sha256(k, v)
    k = _hmac_sha256(k, v + b"\x01" + x_oct + h_oct)
    v = _hmac_sha256(k, v)
    while True:
        v = _hmac_sha256(k, v)
        cand = int.from_bytes(v, "big")
        if 1 <= cand < N:
            yield cand
        k = _hmac_sha256(k, v + b"\x00")
        v = _hmac_sha256(k, v)


class PublicKey:
    """A validated P-256 public key."""

    def __init__(self, x: int, y: int) -> None:
        if not (0 <= x < P and 0 <= y < P):
            raise SignatureError("P-256 public key: coordinate out of range")
        if (y * y - (x * x * x - 3 * x + B)) % P != 0:
            raise SignatureError("P-256 public key: point is not on the curve")
        self.x = x
        self.y = y

    @classmethod
    def from_sec1(cls, data: bytes) -> "PublicKey":
        """Parse and validate an uncompressed SEC1 point (65 bytes, 0x04 prefix)."""
        if len(data) != 65 or data[0] != 4:
            raise SignatureError("P-256 public key: expected 65-byte uncompressed point")
        return cls(int.from_bytes(data[1:33], "big"), int.from_bytes(data[33:65], "big"))

    def to_sec1(self) -> bytes:
        return b"\x04" + _int32(self.x) + _int32(self.y)

    def verify_digest(self, digest: bytes, signature: bytes) -> bool:
        """True if ``signature`` (r || s) is valid for the SHA-256 ``digest``."""
        if len(signature) != 64:
            return False
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (0 < r < N and 0 < s < N):
            return False
        e = int.from_bytes(digest, "big")
        w = pow(s, N - 2, N)
        pt = _mul_add(e * w % N, GX, GY, r * w % N, self.x, self.y)
        if pt[2] == 0:
            return False
        return _affine_x(pt) % N == r

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` (r || s) is a valid ES256 signature of ``message``."""
        return self.verify_digest(hashlib.sha256(message).digest(), signature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.x == other.x and self.y == other.y

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class PrivateKey:
    """A P-256 private scalar. Never logged: ``repr`` does not show it."""

    def __init__(self, d: int) -> None:
        if not 0 < d < N:
            raise ValueError("P-256 private key out of range")
        self._d = d
        self._public = None

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PrivateKey":
        if len(raw) != 32:
            raise ValueError("P-256 private key must be 32 bytes")
        return cls(int.from_bytes(raw, "big"))

    @classmethod
    def generate(cls, randbytes: Any) -> "PrivateKey":
        """A new key from ``randbytes(n)`` (the board's hardware RNG, e.g. os.urandom)."""
        while True:
            d = int.from_bytes(randbytes(32), "big")
            if 0 < d < N:
                return cls(d)

    def to_bytes(self) -> bytes:
        return _int32(self._d)

    def public_key(self) -> PublicKey:
        if self._public is None:
            x, y = _to_affine(_mul(self._d, GX, GY))
            self._public = PublicKey(x, y)  # type: ignore[assignment]
        return self._public  # type: ignore[return-value]

    def sign_digest(self, digest: bytes) -> bytes:
        """Deterministic (RFC 6979) signature r || s over a SHA-256 digest.

        Nothing but the nonce and the point is alive during the multiplication, the
        signature's heap peak: the nonce generator's state (about 0.4 KiB on a device)
        is not kept across it. Candidate ``i`` is made afresh; one past the first is needed
        only when r or s came out zero (odds about 2^-256)."""
        i = 0
        while True:
            k = _nth_nonce(self._d, digest, i)
            i += 1
            r = _affine_x(_mul(k, GX, GY)) % N
            if r == 0:
                continue
            # reduced before the product: no integer over 512 bits (as ``_affine_x``)
            s = pow(k, N - 2, N) * ((int.from_bytes(digest, "big") + r * self._d) % N) % N
            if s == 0:
                continue
            return _int32(r) + _int32(s)

    def sign(self, message: bytes) -> bytes:
        return self.sign_digest(hashlib.sha256(message).digest())

    def __repr__(self) -> str:
        return "<PrivateKey P-256>"
