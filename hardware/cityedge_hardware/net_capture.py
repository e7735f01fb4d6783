"""What the network probe saw on a host, as data: the input of ``net_rules``.

``net_probe`` fills a ``NetCapture`` from a live host; ``cityedge hw net --save-scan F``
writes it as JSON and ``--scan-json F`` reads it back, so the rules can be run again on a
scan (or on one a vendor sends) without the device. Bytes (banners, replies, a certificate)
are kept raw, as hex or base64 in the JSON: the rules decide on what the wire carried, not
on a summary of it.

``from_json`` takes untrusted input: every field is checked for its type, every string,
list and byte string against ``HardwareLimits``, and any fault is a ``NetDataError`` naming
the field. Unknown keys are refused (a capture is written by this module only).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cityedge_hardware.errors import NetDataError
from cityedge_hardware.limits import LIMITS, HardwareLimits

SCHEMA = "cityedge-net-scan/1"

# port states: open (a TCP connect or a UDP answer), closed (refused: TCP RST or ICMP port
# unreachable), filtered (a TCP connect that timed out), silent (a UDP datagram with no
# answer and no refusal: open, or filtered), error (anything else; ``detail`` says what)
PORT_STATES = ("open", "closed", "filtered", "silent", "error")
# one handshake at one TLS version: accepted (the server answered a ServerHello at that
# version), refused (an alert, or a ServerHello at another version), untestable (this
# host's OpenSSL cannot offer the version), error (timeout, reset, garbage: ``detail``)
HANDSHAKE_RESULTS = ("accepted", "refused", "untestable", "error")
# one MQTT CONNECT without credentials: answered (``answer`` holds what came back, a
# CONNACK or not), tls-refused (the TLS layer refused a client without a certificate),
# closed (the peer closed without a byte), timeout, error
MQTT_RESULTS = ("answered", "tls-refused", "closed", "timeout", "error")
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


@dataclass(frozen=True)
class PortState:
    """One port: its state and what the service said (unprompted, and to an HTTP HEAD)."""

    proto: str  # tcp | udp
    port: int
    state: str  # PORT_STATES
    detail: str = ""  # why (the error, the timeout)
    banner: bytes = b""  # what a TCP service sent before the probe said anything
    reply: bytes = b""  # the answer to the probe's HTTP HEAD (TCP) or datagram (UDP)


@dataclass(frozen=True)
class Handshake:
    """One TLS handshake offering exactly one version (and, for suites, chosen ciphers)."""

    version: str  # the version offered (TLS_VERSIONS)
    result: str  # HANDSHAKE_RESULTS
    cipher: str = ""  # the suite the server chose (OpenSSL name, or 0xNNNN)
    detail: str = ""


@dataclass(frozen=True)
class TlsEndpoint:
    """A TCP port that answered a TLS ClientHello."""

    port: int
    handshakes: tuple[Handshake, ...]
    weak_offered: tuple[str, ...] = ()  # weak TLS 1.2 suites the probe offered
    weak_accepted: tuple[str, ...] = ()  # those the server chose, one handshake each
    certificate: bytes = b""  # the server's leaf certificate (DER), b"" if none was seen
    client_cert_requested: bool = False  # a TLS 1.2 CertificateRequest was seen


@dataclass(frozen=True)
class MqttAttempt:
    """An MQTT 3.1.1 CONNECT without username, password or client certificate."""

    port: int
    transport: str  # tcp | tls
    result: str  # MQTT_RESULTS
    answer: bytes = b""
    detail: str = ""
    named: bool = False  # 1883, 8883 or a port the vendor named as MQTT


@dataclass(frozen=True)
class NetCapture:
    host: str
    scanned_at: str  # ISO 8601 UTC, the clock certificates are judged against
    tcp_ports: tuple[int, ...]  # the ports scanned
    udp_ports: tuple[int, ...]
    ports: tuple[PortState, ...] = ()
    tls: tuple[TlsEndpoint, ...] = ()
    mqtt: tuple[MqttAttempt, ...] = ()
    notes: tuple[str, ...] = field(default=())  # what the probe could not do, and why

    def open_ports(self) -> list[PortState]:
        return [p for p in self.ports if p.state == "open"]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "host": self.host, "scanned_at": self.scanned_at,
            "tcp_ports": list(self.tcp_ports), "udp_ports": list(self.udp_ports),
            "ports": [{"proto": p.proto, "port": p.port, "state": p.state,
                       "detail": p.detail, "banner": p.banner.hex(), "reply": p.reply.hex()}
                      for p in self.ports],
            "tls": [{"port": t.port,
                     "handshakes": [{"version": h.version, "result": h.result,
                                     "cipher": h.cipher, "detail": h.detail}
                                    for h in t.handshakes],
                     "weak_offered": list(t.weak_offered),
                     "weak_accepted": list(t.weak_accepted),
                     "certificate": base64.b64encode(t.certificate).decode(),
                     "client_cert_requested": t.client_cert_requested}
                    for t in self.tls],
            "mqtt": [{"port": m.port, "transport": m.transport, "result": m.result,
                      "answer": m.answer.hex(), "detail": m.detail, "named": m.named}
                     for m in self.mqtt],
            "notes": list(self.notes),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"


# --- reading a capture back (untrusted) ----------------------------------------------------

T = TypeVar("T")
_TEXT_MAX = 400  # characters of a detail, note, host or cipher name


class _Reader:
    def __init__(self, limits: HardwareLimits) -> None:
        self.limits = limits

    def obj(self, d: Any, where: str, keys: set[str]) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise NetDataError("%s: expected an object" % where)
        extra = set(d) - keys
        missing = keys - set(d)
        if extra or missing:
            raise NetDataError("%s: %s" % (where, "unknown keys %s" % sorted(extra) if extra
                                           else "missing keys %s" % sorted(missing)))
        return d

    def text(self, v: Any, where: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(v, str) or len(v) > _TEXT_MAX:
            raise NetDataError("%s: expected a string of at most %d characters"
                               % (where, _TEXT_MAX))
        if choices and v not in choices:
            raise NetDataError("%s: %r is not one of %s" % (where, v, ", ".join(choices)))
        return v

    def port(self, v: Any, where: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
            raise NetDataError("%s: expected a port number 1..65535" % where)
        return v

    def flag(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            raise NetDataError("%s: expected true or false" % where)
        return v

    def hexbytes(self, v: Any, where: str, limit: int) -> bytes:
        if not isinstance(v, str) or len(v) > 2 * limit:
            raise NetDataError("%s: expected hex of at most %d bytes" % (where, limit))
        try:
            return bytes.fromhex(v)
        except ValueError as e:
            raise NetDataError("%s: expected hex bytes" % where) from e

    def b64(self, v: Any, where: str, limit: int) -> bytes:
        if not isinstance(v, str) or len(v) > (limit + 2) // 3 * 4:
            raise NetDataError("%s: expected base64 of at most %d bytes" % (where, limit))
        try:
            b = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise NetDataError("%s: expected base64" % where) from e
        if len(b) > limit:
            raise NetDataError("%s: more than %d bytes" % (where, limit))
        return b

    def items(self, v: Any, where: str, each: Callable[[Any, str], T]) -> tuple[T, ...]:
        if not isinstance(v, list) or len(v) > self.limits.net_max_ports:
            raise NetDataError("%s: expected a list of at most %d entries"
                               % (where, self.limits.net_max_ports))
        return tuple(each(x, "%s[%d]" % (where, i)) for i, x in enumerate(v))


def from_json(data: bytes, source: str = "scan",
              limits: HardwareLimits = LIMITS) -> NetCapture:
    """Read a capture ``dumps`` wrote (``NetDataError`` naming the field when it does not)."""
    if len(data) > limits.net_scan_json_max_bytes:
        raise NetDataError("%s is larger than a scan can be (%d bytes)"
                           % (source, limits.net_scan_json_max_bytes))
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise NetDataError("%s is not JSON: %s" % (source, e)) from e
    r = _Reader(limits)
    top = r.obj(doc, source, {"schema", "host", "scanned_at", "tcp_ports", "udp_ports",
                              "ports", "tls", "mqtt", "notes"})
    if top["schema"] != SCHEMA:
        raise NetDataError("%s: schema is %r, not %r" % (source, top["schema"], SCHEMA))
    bmax = limits.net_banner_max_bytes

    def port_state(d: Any, w: str) -> PortState:
        d = r.obj(d, w, {"proto", "port", "state", "detail", "banner", "reply"})
        return PortState(r.text(d["proto"], w + ".proto", ("tcp", "udp")),
                         r.port(d["port"], w + ".port"),
                         r.text(d["state"], w + ".state", PORT_STATES),
                         r.text(d["detail"], w + ".detail"),
                         r.hexbytes(d["banner"], w + ".banner", bmax),
                         r.hexbytes(d["reply"], w + ".reply", bmax))

    def handshake(d: Any, w: str) -> Handshake:
        d = r.obj(d, w, {"version", "result", "cipher", "detail"})
        return Handshake(r.text(d["version"], w + ".version", TLS_VERSIONS),
                         r.text(d["result"], w + ".result", HANDSHAKE_RESULTS),
                         r.text(d["cipher"], w + ".cipher"), r.text(d["detail"], w + ".detail"))

    def endpoint(d: Any, w: str) -> TlsEndpoint:
        d = r.obj(d, w, {"port", "handshakes", "weak_offered", "weak_accepted", "certificate",
                         "client_cert_requested"})
        return TlsEndpoint(r.port(d["port"], w + ".port"),
                           r.items(d["handshakes"], w + ".handshakes", handshake),
                           r.items(d["weak_offered"], w + ".weak_offered", r.text),
                           r.items(d["weak_accepted"], w + ".weak_accepted", r.text),
                           r.b64(d["certificate"], w + ".certificate",
                                 limits.net_cert_max_bytes),
                           r.flag(d["client_cert_requested"], w + ".client_cert_requested"))

    def attempt(d: Any, w: str) -> MqttAttempt:
        d = r.obj(d, w, {"port", "transport", "result", "answer", "detail", "named"})
        return MqttAttempt(r.port(d["port"], w + ".port"),
                           r.text(d["transport"], w + ".transport", ("tcp", "tls")),
                           r.text(d["result"], w + ".result", MQTT_RESULTS),
                           r.hexbytes(d["answer"], w + ".answer", bmax),
                           r.text(d["detail"], w + ".detail"), r.flag(d["named"], w + ".named"))

    return NetCapture(
        host=r.text(top["host"], source + ".host"),
        scanned_at=r.text(top["scanned_at"], source + ".scanned_at"),
        tcp_ports=r.items(top["tcp_ports"], source + ".tcp_ports", r.port),
        udp_ports=r.items(top["udp_ports"], source + ".udp_ports", r.port),
        ports=r.items(top["ports"], source + ".ports", port_state),
        tls=r.items(top["tls"], source + ".tls", endpoint),
        mqtt=r.items(top["mqtt"], source + ".mqtt", attempt),
        notes=r.items(top["notes"], source + ".notes", r.text),
    )
