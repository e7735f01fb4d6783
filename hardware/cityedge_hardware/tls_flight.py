"""Read a TLS server's first flight (RFC 5246 §6.2 and §7.4, RFC 8446 §4 and §5): which
version and cipher suite it chose, whether it asked for a client certificate, its
certificate (TLS 1.2 and older send it in clear), or the alert it answered with.

Sans-IO: ``read_flight(data)`` parses bytes the probe received and trusts nothing: every
length is checked against what is there, and parsing stops at the first record that is not
a handshake record (a TLS 1.3 server encrypts everything after its ServerHello). The probe
needs this because Python's ``ssl`` reports only a finished handshake: a server that
demands a client certificate makes the client's handshake fail *after* the server has
chosen its version, and that choice is what the version rule decides on.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION_NAMES = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2",
                 0x0304: "TLSv1.3"}
_REC_HANDSHAKE = 22
_REC_ALERT = 21
_HS_SERVER_HELLO = 2
_HS_CERTIFICATE = 11
_HS_CERTIFICATE_REQUEST = 13
_EXT_SUPPORTED_VERSIONS = 43
# RFC 8446 §4.1.3: a ServerHello with this random is a HelloRetryRequest
_HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac",
          40: "handshake_failure", 42: "bad_certificate", 47: "illegal_parameter",
          48: "unknown_ca", 50: "decode_error", 51: "decrypt_error",
          70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
          86: "inappropriate_fallback", 109: "missing_extension",
          112: "unrecognized_name", 116: "certificate_required", 120: "no_application_protocol"}


@dataclass(frozen=True)
class ServerFlight:
    version: str = ""  # the version the ServerHello chose ("" when none came)
    cipher: int | None = None  # the suite's IANA code
    retry: bool = False  # the ServerHello was a HelloRetryRequest
    alert: str = ""  # the first alert in clear, by name
    client_cert_requested: bool = False
    certificate: bytes = b""  # the leaf certificate, when sent in clear
    fault: str = ""  # why parsing stopped early ("" for a clean stop)


def _records(data: bytes) -> tuple[bytes, str, str]:
    """The handshake bytes of the leading handshake records, the first alert, a fault."""
    hs = bytearray()
    i = 0
    while i < len(data):
        if len(data) - i < 5:
            return bytes(hs), "", "a record header cut short"
        rtype, length = data[i], int.from_bytes(data[i + 3:i + 5], "big")
        body = data[i + 5:i + 5 + length]
        if len(body) < length:
            if rtype == _REC_HANDSHAKE:
                hs += body  # the rest is parsed as far as it goes
            return bytes(hs), "", "a record cut short"
        if rtype == _REC_ALERT:
            alert = ALERTS.get(body[1], "alert %d" % body[1]) if len(body) >= 2 else "alert"
            return bytes(hs), alert, ""
        if rtype != _REC_HANDSHAKE:
            if rtype in (20, 23):  # ChangeCipherSpec, then encrypted records
                return bytes(hs), "", ""
            return bytes(hs), "", "record type %d is not TLS" % rtype
        hs += body
        i += 5 + length
    return bytes(hs), "", ""


def _server_hello(body: bytes) -> tuple[str, int, bool] | None:
    if len(body) < 38:
        return None
    legacy = int.from_bytes(body[0:2], "big")
    retry = body[2:34] == _HRR_RANDOM
    sid_len = body[34]
    j = 35 + sid_len
    if len(body) < j + 3:
        return None
    cipher = int.from_bytes(body[j:j + 2], "big")
    version = legacy
    j += 3  # cipher suite and compression method
    if len(body) >= j + 2:
        end = min(len(body), j + 2 + int.from_bytes(body[j:j + 2], "big"))
        j += 2
        while j + 4 <= end:
            etype = int.from_bytes(body[j:j + 2], "big")
            elen = int.from_bytes(body[j + 2:j + 4], "big")
            if etype == _EXT_SUPPORTED_VERSIONS and elen == 2 and j + 6 <= end:
                version = int.from_bytes(body[j + 4:j + 6], "big")
            j += 4 + elen
    return VERSION_NAMES.get(version, "0x%04x" % version), cipher, retry


def _leaf_certificate(body: bytes) -> bytes:
    # TLS 1.2 Certificate: certificate_list<0..2^24-1> of ASN.1Cert<1..2^24-1>
    if len(body) < 6:
        return b""
    first = int.from_bytes(body[3:6], "big")
    return body[6:6 + first] if 6 + first <= len(body) else b""


def read_flight(data: bytes) -> ServerFlight:
    """What ``data`` (the bytes a server sent after a ClientHello) says."""
    hs, alert, fault = _records(data)
    version, cipher, retry = "", None, False
    requested, cert = False, b""
    i = 0
    while i + 4 <= len(hs):
        mtype, mlen = hs[i], int.from_bytes(hs[i + 1:i + 4], "big")
        body = hs[i + 4:i + 4 + mlen]
        if len(body) < mlen:
            fault = fault or "a handshake message cut short"
            break
        if mtype == _HS_SERVER_HELLO and not version:
            hello = _server_hello(body)
            if hello is None:
                fault = "a ServerHello too short to read"
                break
            version, cipher, retry = hello
        elif mtype == _HS_CERTIFICATE and not cert:
            cert = _leaf_certificate(body)
        elif mtype == _HS_CERTIFICATE_REQUEST:
            requested = True
        i += 4 + mlen
    if not version and not alert and not fault and data:
        fault = "no ServerHello in %d bytes" % len(data)
    return ServerFlight(version, cipher, retry, alert, requested, cert, fault)
