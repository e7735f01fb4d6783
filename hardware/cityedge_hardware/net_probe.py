"""The network probe: scan a host the vendor controls and record what it serves
(``net_rules`` decides). ``check_network`` is the one call the ``hw check`` orchestrator
makes; ``scan`` returns the capture that ``--save-scan`` keeps.

Safety first: ``resolve_target`` refuses any address outside loopback, RFC 1918 / ULA
private and link-local space unless ``allow_public`` is given; a scan probes at most
``net_max_ports`` ports, makes at most ``net_rate_per_s`` connection attempts (or
datagrams) a second, one at a time, and every connect, read and handshake has a timeout.
The probe sends only what a client would: a TCP connect, an HTTP ``HEAD /``, TLS
ClientHellos, an MQTT CONNECT without credentials, and small UDP requests (DNS, NTP, CoAP
ping); it never logs in, and it sends no password.

For each TCP port: a connect (refused: closed; timed out: filtered); if open, a wait of
``net_banner_wait_s`` for a service that speaks first (Telnet, FTP, SSH). A port that said
nothing is offered a TLS ClientHello; if it answers TLS, each version TLS 1.0..1.3 alone,
then (when it takes TLS 1.2) the weak TLS 1.2 suites this OpenSSL knows, one round per
suite the server picks, so every weak suite it accepts is named. Then an MQTT CONNECT
without credentials (over TLS without a client certificate on a TLS port), and on a plain
port that is not MQTT an HTTP ``HEAD /``. Ports are probed one after the other: a slow scan
of a small device is kinder than a fast one (an ESP32 has a handful of sockets).

TLS: Python's ``ssl`` with explicit minimum and maximum versions and ``@SECLEVEL=0``, so
that TLS 1.0 and 1.1 and weak suites can be *offered* and a server that accepts them is
seen (Debian's OpenSSL refuses them at its default level). The server's answer is read from
the raw bytes (``tls_flight``), not from the handshake's success: a server that demands a
client certificate fails the client's handshake after it has chosen its version. SSLv3 is
not offered (OpenSSL 3 cannot); RC4 and EXPORT suites are not in OpenSSL 3's default
provider, so a server offering only those is seen as refusing them.

Every error is data, not an exception: a refused, timed-out, reset or garbled exchange is
recorded with what happened, and the rules say ``could not decide`` when it matters.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cityedge_hardware.errors import ScanRefused
from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.net_capture import (
    TLS_VERSIONS,
    Handshake,
    MqttAttempt,
    NetCapture,
    PortState,
    TlsEndpoint,
)
from cityedge_hardware.net_rules import (
    MQTT_PORTS,
    PortSpec,
    check_capture,
    parse_connack,
    weak_reason,
)
from cityedge_hardware.tls_flight import read_flight
from cityedge_hardware.verdict import Verdict
from cityedge_host.errors import UserError

Progress = Callable[[str], None] | None

# well-known ports of IoT devices and gateways, and every clear-text port net_rules lists
DEFAULT_TCP_PORTS = (21, 22, 23, 80, 443, 502, 513, 514, 1880, 1883, 2323, 4840, 5000,
                     7547, 8000, 8080, 8081, 8266, 8443, 8883, 9000)
DEFAULT_UDP_PORTS = (53, 69, 123, 161, 1900, 5353, 5683, 5684)
ALLOWED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
    "169.254.0.0/16", "fe80::/10"))

_UDP_PAYLOADS = {
    53: bytes.fromhex("1234 0100 0001 0000 0000 0000 00 0002 0001"),  # DNS query: . NS
    123: b"\x1b" + bytes(47),  # NTP client request
    5683: b"\x40\x00\x12\x34",  # CoAP ping (empty confirmable message)
}
_MQTT_CLIENT_ID = b"cityedge-net-probe"
_VAR = b"\x00\x04MQTT\x04\x02\x00\x1e"  # MQTT 3.1.1, clean session, no user or password
_PAYLOAD = len(_MQTT_CLIENT_ID).to_bytes(2, "big") + _MQTT_CLIENT_ID
MQTT_CONNECT = b"\x10" + bytes([len(_VAR) + len(_PAYLOAD)]) + _VAR + _PAYLOAD
HTTP_HEAD = b"HEAD / HTTP/1.0\r\n\r\n"
_ALL_SUITES = "ALL:COMPLEMENTOFALL:@SECLEVEL=0"


def resolve_target(host: str, allow_public: bool = False) -> str:
    """The address to scan for ``host`` (``ScanRefused`` outside the allowed networks)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError("cannot resolve %r: %s" % (host, e),
                        hint="give the device's IP address with --host") from e
    addrs = sorted({str(info[4][0]) for info in infos})  # fe80::1%eth0 keeps its scope
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not allow_public and not any(ip in n for n in ALLOWED_NETWORKS):
            raise ScanRefused("%s (%s) is not a loopback, private or link-local address: "
                              "the probe does not scan it without --allow-public" % (host, a))
    return addrs[0]


class Pacer:
    """At most ``rate`` attempts a second: ``wait()`` before each one."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError("the rate must be positive")
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self.next = clock()

    def wait(self) -> None:
        now = self.clock()
        if now < self.next:
            self.sleep(self.next - now)
        self.next = max(now, self.next) + self.interval


@dataclass
class _Ctx:
    addr: str
    sni: str | None
    pacer: Pacer
    limits: HardwareLimits


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return "TLS: %s" % (e.reason or e.__class__.__name__)
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, str(e.errno)) + ": " + (e.strerror or "")
    return str(e) or e.__class__.__name__


def _connect(c: _Ctx, port: int) -> socket.socket:
    c.pacer.wait()
    return socket.create_connection((c.addr, port), timeout=c.limits.net_connect_timeout_s)


def _read(sock: socket.socket | ssl.SSLSocket, limit: int, timeout: float,
          enough: Callable[[bytes], bool] = lambda b: False) -> tuple[bytes, str]:
    """Bytes until ``limit``, ``enough``, the peer closes (``"closed"``) or the deadline."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < limit and not enough(bytes(got)):
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(got), "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(limit - len(got))
        except TimeoutError:
            return bytes(got), "timeout"
        if not chunk:
            return bytes(got), "closed"
        got += chunk
    return bytes(got), ""


def _tcp_port(c: _Ctx, port: int) -> tuple[PortState, socket.socket | None]:
    try:
        sock = _connect(c, port)
    except ConnectionRefusedError:
        return PortState("tcp", port, "closed"), None
    except TimeoutError:
        return PortState("tcp", port, "filtered", "no answer in %.1f s"
                         % c.limits.net_connect_timeout_s), None
    except (ConnectionResetError, ConnectionAbortedError) as e:
        # a reset, not a refusal: the handshake completed (a SYN answered with RST is
        # ECONNREFUSED), so a service accepted and dropped us before connect() returned
        return PortState("tcp", port, "open", "reset right after the handshake (%s)"
                         % _why(e)), None
    except OSError as e:
        return PortState("tcp", port, "error", _why(e)), None
    return PortState("tcp", port, "open"), sock


def _banner(sock: socket.socket, c: _Ctx) -> tuple[bytes, str]:
    try:
        data, _ = _read(sock, c.limits.net_banner_max_bytes, c.limits.net_banner_wait_s)
        return data, ""
    except OSError as e:
        return b"", _why(e)
    finally:
        sock.close()


def _context(version: str | None, ciphers: str = _ALL_SUITES) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the rules judge the certificate, not the handshake
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: offered to be detected
        warnings.simplefilter("ignore", DeprecationWarning)
        lo = ssl.TLSVersion[version.replace(".", "_")] if version else ssl.TLSVersion.TLSv1
        hi = ssl.TLSVersion[version.replace(".", "_")] if version else ssl.TLSVersion.TLSv1_3
        ctx.minimum_version = lo
        ctx.maximum_version = hi
    ctx.set_ciphers(ciphers)
    return ctx


@dataclass
class _Exchange:
    flight: bytes = b""
    completed: bool = False
    certificate: bytes = b""
    error: str = ""
    sent: bool = False


def _handshake(c: _Ctx, port: int, ctx: ssl.SSLContext) -> _Exchange:
    """One ClientHello and the server's bytes, through memory BIOs (the raw flight kept)."""
    ex = _Exchange()
    try:
        sock = _connect(c, port)
    except OSError as e:
        ex.error = _why(e)
        return ex
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=c.sni)
    deadline = time.monotonic() + c.limits.net_reply_timeout_s
    try:
        while True:
            try:
                obj.do_handshake()
                ex.completed = True
                ex.certificate = obj.getpeercert(binary_form=True) or b""
                return ex
            except ssl.SSLWantReadError:
                pass
            out = outgoing.read()
            if out:
                sock.sendall(out)
                ex.sent = True
            left = deadline - time.monotonic()
            if left <= 0:
                ex.error = "timed out"
                return ex
            sock.settimeout(left)
            chunk = sock.recv(4096)
            if not chunk:
                ex.error = "the server closed the connection"
                return ex
            if len(ex.flight) < c.limits.net_flight_max_bytes:
                ex.flight += chunk[:c.limits.net_flight_max_bytes - len(ex.flight)]
            incoming.write(chunk)
    except (ssl.SSLError, OSError) as e:
        ex.error = _why(e)
        return ex
    finally:
        sock.close()


def _cipher_names() -> dict[int, str]:
    return {int(s["id"]) & 0xFFFF: str(s["name"]) for s in _context(None).get_ciphers()}


def _version_handshake(c: _Ctx, port: int, version: str, names: dict[int, str]
                       ) -> tuple[Handshake, bytes]:
    try:
        ctx = _context(version)
    except (ValueError, ssl.SSLError, KeyError) as e:
        return Handshake(version, "untestable", detail="this OpenSSL: %s" % _why(e)), b""
    ex = _handshake(c, port, ctx)
    flight = read_flight(ex.flight)
    cert = flight.certificate or ex.certificate
    if flight.version == version:
        name = names.get(flight.cipher or -1, "0x%04x" % (flight.cipher or 0))
        return Handshake(version, "accepted", name, ex.error), cert
    if flight.version:
        return Handshake(version, "refused", detail="the server chose %s" % flight.version), b""
    if flight.alert:
        return Handshake(version, "refused", detail="alert %s" % flight.alert), b""
    if not ex.sent:
        return Handshake(version, "untestable", detail="this OpenSSL: %s" % ex.error), b""
    if ex.error in ("the server closed the connection",) or "ECONNRESET" in ex.error:
        return Handshake(version, "refused", detail=ex.error + " without a ServerHello"), b""
    return Handshake(version, "error", detail=flight.fault or ex.error), b""


def _weak_suites(c: _Ctx, port: int, names: dict[int, str]) -> tuple[list[str], list[str]]:
    """The weak TLS 1.2 suites offered, and those the server picked (one round each)."""
    offered = sorted({n for n in names.values() if weak_reason(n)
                      and "PSK" not in n and "SRP" not in n})
    remaining = list(offered)
    accepted: list[str] = []
    for _ in range(c.limits.net_cipher_rounds):
        if not remaining:
            break
        try:
            ctx = _context("TLSv1.2", ":".join(remaining) + ":@SECLEVEL=0")
        except ssl.SSLError:
            break
        flight = read_flight(_handshake(c, port, ctx).flight)
        chosen = names.get(flight.cipher or -1, "") if flight.version == "TLSv1.2" else ""
        if chosen not in remaining:
            break
        accepted.append(chosen)
        remaining.remove(chosen)
    return offered, accepted


def _tls_endpoint(c: _Ctx, port: int, names: dict[int, str]) -> TlsEndpoint | None:
    first = read_flight(_handshake(c, port, _context(None)).flight)
    if not first.version:
        return None
    handshakes: list[Handshake] = []
    cert = b""
    requested = first.client_cert_requested
    for version in TLS_VERSIONS:
        hs, got = _version_handshake(c, port, version, names)
        handshakes.append(hs)
        cert = cert or got
    offered: list[str] = []
    accepted: list[str] = []
    if any(h.version == "TLSv1.2" and h.result == "accepted" for h in handshakes):
        offered, accepted = _weak_suites(c, port, names)
        ex = _handshake(c, port, _context("TLSv1.2"))
        requested = requested or read_flight(ex.flight).client_cert_requested
    return TlsEndpoint(port, tuple(handshakes), tuple(offered), tuple(accepted), cert,
                       requested)


def _mqtt(c: _Ctx, port: int, tls: bool, named: bool) -> MqttAttempt:
    transport = "tls" if tls else "tcp"
    try:
        sock: socket.socket | ssl.SSLSocket = _connect(c, port)
    except OSError as e:
        return MqttAttempt(port, transport, "error", detail=_why(e), named=named)
    stage = "connect"
    try:
        if tls:
            stage = "TLS handshake"
            sock.settimeout(c.limits.net_reply_timeout_s)
            sock = _context(None).wrap_socket(sock, server_hostname=c.sni)
        stage = "CONNECT"
        sock.sendall(MQTT_CONNECT)
        answer, end = _read(sock, 4, c.limits.net_reply_timeout_s)
    except ssl.SSLError as e:
        return MqttAttempt(port, transport, "tls-refused", detail="%s: %s" % (stage, _why(e)),
                           named=named)
    except OSError as e:
        result = "timeout" if isinstance(e, TimeoutError) else "error"
        return MqttAttempt(port, transport, result, detail="%s: %s" % (stage, _why(e)),
                           named=named)
    finally:
        sock.close()
    if answer:
        return MqttAttempt(port, transport, "answered", answer, end, named)
    if tls and end == "closed":
        # a broker that lets a client in answers CONNACK (a refusal too, with its code); a
        # TLS server that closes instead refused the session: with TLS 1.3 the client's
        # handshake ends before the server has checked for a certificate, so its alert
        # (or only its close) comes here
        return MqttAttempt(port, transport, "tls-refused", named=named,
                           detail="CONNECT: the TLS server closed the session unanswered")
    return MqttAttempt(port, transport, end or "closed", detail="no byte after CONNECT",
                       named=named)


def _http(c: _Ctx, port: int) -> bytes:
    try:
        sock = _connect(c, port)
    except OSError:
        return b""
    try:
        sock.sendall(HTTP_HEAD)
        return _read(sock, c.limits.net_banner_max_bytes, c.limits.net_reply_timeout_s)[0]
    except OSError:
        return b""
    finally:
        sock.close()


def _udp_port(c: _Ctx, port: int) -> PortState:
    family = socket.AF_INET6 if ":" in c.addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(c.limits.net_udp_wait_s)
        try:
            c.pacer.wait()
            sock.connect((c.addr, port))
            sock.send(_UDP_PAYLOADS.get(port, b"\r\n"))
            reply = sock.recv(c.limits.net_banner_max_bytes)
        except ConnectionRefusedError:
            return PortState("udp", port, "closed", "ICMP port unreachable")
        except TimeoutError:
            return PortState("udp", port, "silent", "no answer in %.1f s"
                             % c.limits.net_udp_wait_s)
        except OSError as e:
            return PortState("udp", port, "error", _why(e))
    return PortState("udp", port, "open", reply=reply)


def scan(host: str, *, tcp_ports: Iterable[int] | None = None,
         udp_ports: Iterable[int] | None = None, mqtt_ports: Iterable[int] = (),
         allow_public: bool = False, limits: HardwareLimits = LIMITS,
         progress: Progress = None) -> NetCapture:
    """Probe ``host`` (rules in the module docstring) and return what it served."""
    tcp = sorted(set(DEFAULT_TCP_PORTS if tcp_ports is None else tcp_ports))
    udp = sorted(set(DEFAULT_UDP_PORTS if udp_ports is None else udp_ports))
    if len(tcp) + len(udp) > limits.net_max_ports:
        raise UserError("%d ports asked for; a scan probes at most %d"
                        % (len(tcp) + len(udp), limits.net_max_ports),
                        hint="name the ports the device may serve with --ports")
    if any(not 1 <= p <= 65535 for p in (*tcp, *udp)):
        raise UserError("a port is outside 1..65535", hint="fix --ports / --udp-ports")
    addr = resolve_target(host, allow_public)
    try:
        ipaddress.ip_address(host)
        sni = None
    except ValueError:
        sni = host
    c = _Ctx(addr, sni, Pacer(limits.net_rate_per_s), limits)
    say = progress or (lambda _m: None)
    named_mqtt = set(MQTT_PORTS) | set(mqtt_ports)
    scanned_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    names = _cipher_names()
    ports: list[PortState] = []
    endpoints: list[TlsEndpoint] = []
    attempts: list[MqttAttempt] = []
    notes: list[str] = []
    say("network: %d TCP and %d UDP ports on %s" % (len(tcp), len(udp), addr))
    for port in tcp:
        state, sock = _tcp_port(c, port)
        if state.state != "open":
            ports.append(state)
            continue
        say("network: %d/tcp is open" % port)
        if sock is None:  # reset right after the handshake: no banner to read
            banner, err = b"", state.detail
        else:
            banner, err = _banner(sock, c)
        if err:
            notes.append("%d/tcp: reading its banner failed: %s" % (port, err))
        if banner:
            ports.append(PortState("tcp", port, "open", banner=banner))
            continue
        endpoint = _tls_endpoint(c, port, names)
        if endpoint is not None:
            endpoints.append(endpoint)
        attempt = _mqtt(c, port, endpoint is not None, port in named_mqtt)
        attempts.append(attempt)
        reply = b""
        if endpoint is None and parse_connack(attempt.answer) is None:
            reply = _http(c, port)
        ports.append(PortState("tcp", port, "open", reply=reply))
    for port in udp:
        ports.append(_udp_port(c, port))
    for port in sorted(set(mqtt_ports) - set(tcp)):
        notes.append("MQTT port %d was named but not scanned: add it to --ports" % port)
    return NetCapture(host=host, scanned_at=scanned_at, tcp_ports=tuple(tcp),
                      udp_ports=tuple(udp), ports=tuple(ports), tls=tuple(endpoints),
                      mqtt=tuple(attempts), notes=tuple(notes))


def check_network(host: str, *, tcp_ports: Iterable[int] | None = None,
                  udp_ports: Iterable[int] | None = None, mqtt_ports: Iterable[int] = (),
                  declared: Iterable[PortSpec] = (), allow_public: bool = False,
                  limits: HardwareLimits = LIMITS,
                  progress: Progress = None) -> list[Verdict]:
    """Scan ``host`` and decide the network requirements (the orchestrator's one call)."""
    capture = scan(host, tcp_ports=tcp_ports, udp_ports=udp_ports, mqtt_ports=mqtt_ports,
                   allow_public=allow_public, limits=limits, progress=progress)
    return check_capture(capture, declared)
