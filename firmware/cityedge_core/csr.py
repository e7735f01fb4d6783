"""A minimal DER writer, the PKCS#10 certificate request a device sends to enroll, and the
SEC1 key file it keeps.

``build_csr(key, device)`` returns the DER of a CertificationRequest (RFC 2986 §4):

- subject: ``CN=<device URN>`` (UTF8String; the fleet CA requires CN = the enrolled id);
- subjectPublicKeyInfo: id-ecPublicKey with the named curve prime256v1 and the SEC1
  uncompressed point (RFC 5480 §2);
- one attribute, extensionRequest (PKCS#9, RFC 2985 §5.4.2), asking for subjectAltName
  with one uniformResourceIdentifier = the device URN (RFC 9039 §3; RFC 5280 §4.2.1.6);
- signed with ecdsa-with-SHA256 (RFC 5758 §3.2: no parameters), the signature value a DER
  ``Ecdsa-Sig-Value`` (RFC 3279 §2.2.3) made by ``p256.PrivateKey.sign`` (RFC 6979 nonces).

``ec_private_key_der(key)`` is the ECPrivateKey (RFC 5915 §3) with the curve and the
public key, the form MicroPython's ``ssl`` (mbedTLS) loads for the TLS client key and that
``cityedge_fw.keys.private_key_from_der`` reads for batch signing.

Only the DER the device needs is written here (definite lengths, the few universal types
below); nothing here parses DER. No I/O: runs on MicroPython and CPython.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from .limits import DEVICE_ID_MAX_CHARS

# Object identifiers (dotted form; encoded by ``oid``)
OID_COMMON_NAME = "2.5.4.3"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_PRIME256V1 = "1.2.840.10045.3.1.7"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SUBJECT_ALT_NAME = "2.5.29.17"


def _bits(n: int) -> int:
    """``n.bit_length()`` (MicroPython's int has no such method)."""
    return len(bin(n)) - 2 if n > 0 else 0


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((_bits(n) + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag byte, definite length, content."""
    return bytes((tag,)) + _length(len(content)) + content


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def set_of(*items: bytes) -> bytes:
    # DER sorts SET OF members by their encodings (X.690 §11.6)
    return tlv(0x31, b"".join(sorted(items)))


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative INTEGERs are needed here")
    raw = value.to_bytes(max(1, (_bits(value) + 8) // 8), "big")  # keeps a sign bit 0
    return tlv(0x02, raw)


def octet_string(data: bytes) -> bytes:
    return tlv(0x04, data)


def bit_string(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)  # no unused bits


def utf8_string(text: str) -> bytes:
    return tlv(0x0C, text.encode())


def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    if len(parts) < 2 or parts[0] > 2 or (parts[0] < 2 and parts[1] > 39):
        raise ValueError("bad OID %s" % dotted)
    out = bytearray()
    for arc in [parts[0] * 40 + parts[1]] + parts[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        chunk.reverse()
        out.extend(bytes(chunk))
    return tlv(0x06, bytes(out))


def context(number: int, content: bytes, constructed: bool = True) -> bytes:
    """A context-specific tag ``[number]`` (0..30)."""
    return tlv((0xA0 if constructed else 0x80) | number, content)


def _check_device(device: str) -> bytes:
    raw = device.encode()
    if not device.startswith("urn:dev:") or len(device) > DEVICE_ID_MAX_CHARS:
        raise ValueError("device id must be an RFC 9039 URN of at most %d characters"
                         % DEVICE_ID_MAX_CHARS)
    for b in raw:  # IA5String (the SAN URI) is 7-bit ASCII; no controls
        if b < 0x21 or b > 0x7E:
            raise ValueError("device id must be printable ASCII")
    return raw


def ecdsa_sig_value(signature: bytes) -> bytes:
    """``r || s`` (64 bytes) as a DER Ecdsa-Sig-Value (RFC 3279 §2.2.3)."""
    if len(signature) != 64:
        raise ValueError("an ES256 signature is 64 bytes r || s")
    return sequence(integer(int.from_bytes(signature[:32], "big")),
                    integer(int.from_bytes(signature[32:], "big")))


def public_key_info(sec1_point: bytes) -> bytes:
    if len(sec1_point) != 65 or sec1_point[0] != 4:
        raise ValueError("a P-256 public key is a 65-byte uncompressed SEC1 point")
    return sequence(sequence(oid(OID_EC_PUBLIC_KEY), oid(OID_PRIME256V1)),
                    bit_string(sec1_point))


def request_info(device: str, sec1_point: bytes) -> bytes:
    """The CertificationRequestInfo: the bytes the signature covers."""
    uri = _check_device(device)
    subject = sequence(set_of(sequence(oid(OID_COMMON_NAME), utf8_string(device))))
    san = sequence(tlv(0x86, uri))  # GeneralNames: [6] uniformResourceIdentifier
    extensions = sequence(sequence(oid(OID_SUBJECT_ALT_NAME), octet_string(san)))
    attribute = sequence(oid(OID_EXTENSION_REQUEST), set_of(extensions))
    return sequence(integer(0), subject, public_key_info(sec1_point), context(0, attribute))


def build_csr(key: "Any", device: str) -> bytes:
    """DER PKCS#10 request for ``key`` (a ``p256.PrivateKey``), CN and SAN URI = ``device``."""
    info = request_info(device, key.public_key().to_sec1())
    signature = ecdsa_sig_value(key.sign(info))
    return sequence(info, sequence(oid(OID_ECDSA_SHA256)), bit_string(signature))


def ec_private_key_der(key: "Any") -> bytes:
    """RFC 5915 ECPrivateKey DER of a ``p256.PrivateKey`` (curve and public key included)."""
    return sequence(integer(1), octet_string(key.to_bytes()),
                    context(0, oid(OID_PRIME256V1)),
                    context(1, bit_string(key.public_key().to_sec1())))


def pem(label: str, der: bytes) -> str:
    """PEM text of ``der`` (RFC 7468), for files a person or OpenSSL reads."""
    import binascii

    b64 = binascii.b2a_base64(der).replace(b"\n", b"").decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)
