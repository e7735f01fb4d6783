"""The network rules: what a scan of a host (``NetCapture``) shows, as verdicts.

Sans-IO: ``check_capture(capture, declared)`` reads nothing but its arguments (``net_probe``
scans the host). ``declared`` is the vendor's list of ports the device or gateway needs
(``("tcp", 8883)``); everything else must be closed. Each rule decides one check of one
catalogue requirement; every rule says ``could not decide`` (and why) rather than pass
when the scan did not see enough:

- ``open-ports`` (CE-NET-05): every open TCP port, and every UDP port that answered, is
  declared. A UDP port that stayed silent counts as open (it may be open, or filtered) when
  the host refused another UDP port (so a refusal would have come); when the host refused
  none, UDP cannot be decided. A host that answered on no TCP port at all (every connect
  timed out or failed) cannot be decided: it may be off.
- ``clear-text`` (CE-NET-06): no open port on the city's clear-text list (``CLEAR_TEXT``:
  Telnet 23/2323, FTP 21, rlogin/rsh 513/514, HTTP without TLS 80/8080, MicroPython WebREPL
  8266, MQTT without TLS 1883, TFTP 69/udp, CoAP without DTLS 5683/udp), whatever the
  declared list says; and, on any port, no service that *behaves* as one: a Telnet or
  login prompt, an FTP greeting, an HTTP answer without TLS, an MQTT broker on plain TCP.
- ``service-banner`` (CE-NET-07): no banner or reply names software with a version
  (``OpenSSH_9.2``, ``Server: nginx/1.22``, ``BusyBox v1.36``). The SSH identification
  string's software version is required by RFC 4253 §4.2 and passes; comments after it
  (Debian's ``Debian-2+deb12u3``) fail.
- ``tls-versions`` (CE-NET-01): no TLS endpoint accepts a version below TLS 1.2 (the probe
  offers each version alone; ``untestable`` or ``error`` for a version below 1.2 cannot be
  decided).
- ``tls-ciphers`` (CE-NET-01): no endpoint chooses a weak suite at TLS 1.2 or below
  (``weak_reason``: NULL encryption, anonymous key exchange, EXPORT, RC4, DES and 3DES,
  MD5, and CBC with a SHA-1 MAC); TLS 1.3 suites are all AEAD. An endpoint that takes
  TLS 1.2 but to which no weak suite could be offered cannot be decided.
- ``tls-certificate`` (CE-NET-01): each endpoint's certificate is valid at the scan's time,
  not self-signed, names the scanned host in its subjectAltName, has a key of at least
  RSA 2048 / EC 256 bits and is not signed with MD5 or SHA-1.
- ``mqtt-anonymous`` (CE-NET-03): no broker answers a CONNECT without credentials (plain
  TCP, or TLS without a client certificate) with CONNACK return code 0.
- ``mqtt-client-cert`` (CE-AUTH-03): no broker lets an MQTT client in without a client
  certificate: a CONNACK over plain TCP, or over TLS without a certificate, whatever its
  return code (the broker authenticates by password, if at all), fails.

A port the vendor named as MQTT (or 1883/8883) whose attempt timed out or failed makes the
two MQTT rules undecided. With no TLS endpoint at all the TLS rules cannot be decided: a
device that serves nothing is a client, and its own TLS is checked by the ``tls-mitm``
probe (the device meets a bad server), not by a scan.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.net_capture import MqttAttempt, NetCapture, PortState, TlsEndpoint
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

REQ_PORTS = "CE-NET-05"
REQ_CLEAR_TEXT = "CE-NET-06"
REQ_BANNER = "CE-NET-07"
REQ_TLS = "CE-NET-01"
REQ_AUTH = "CE-NET-03"
REQ_CERT_AUTH = "CE-AUTH-03"

PortSpec = tuple[str, int]  # ("tcp" | "udp", port)

CLEAR_TEXT: dict[PortSpec, str] = {
    ("tcp", 21): "FTP", ("tcp", 23): "Telnet", ("tcp", 2323): "Telnet",
    ("tcp", 513): "rlogin", ("tcp", 514): "rsh", ("tcp", 80): "HTTP without TLS",
    ("tcp", 8080): "HTTP without TLS", ("tcp", 8266): "MicroPython WebREPL",
    ("tcp", 1883): "MQTT without TLS", ("udp", 69): "TFTP", ("udp", 5683): "CoAP without DTLS",
}
MQTT_PORTS = (1883, 8883)
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
TLS_BELOW_12 = ("TLSv1", "TLSv1.1")

_FIX_PORTS = ("close the service in the firmware or the gateway's image (or firewall it), or "
              "add the port to the model's declared list (--declared) if the device needs it")
_FIX_CLEAR = ("remove the clear-text service (Telnet, FTP, WebREPL, plain HTTP or MQTT); serve "
              "what is needed over TLS (MQTT on 8883 with client certificates, HTTPS)")
_FIX_BANNER = ("configure the service not to announce its software and version (nginx "
               "server_tokens off; OpenSSH DebianBanner no; a custom FTP/Telnet greeting)")
_FIX_TLS = ("allow TLS 1.2 and 1.3 only (Mosquitto: tls_version tlsv1.2; OpenSSL: "
            "MinProtocol = TLSv1.2; mbedTLS 3 has no older version to turn off)")
_FIX_CIPHERS = ("offer only AEAD suites with forward secrecy (ECDHE with AES-GCM or "
                "ChaCha20-Poly1305); Mosquitto: ciphers ECDHE-ECDSA-AES128-GCM-SHA256:...")
_FIX_CERT = ("issue the server a certificate from the city's CA (cityedge fleet), for the "
             "address clients use, with a P-256 or RSA-2048+ key and SHA-256, and renew it "
             "before it expires")
_FIX_ANON = ("refuse anonymous clients (Mosquitto: allow_anonymous false) and authenticate "
             "every client by its certificate (require_certificate true; `cityedge broker "
             "config` writes such a broker)")
_FIX_CERT_AUTH = ("demand a client certificate from the city CA on every MQTT listener "
                  "(require_certificate true, use_identity_as_username true) and close "
                  "plain-TCP listeners")
_FIX_UNDECIDED = ("check the host is on, reachable from this machine and not rate-limiting, "
                  "then run the probe again (docs/VENDOR_GUIDE.md, 'Network')")

_VERSION = re.compile(rb"[A-Za-z][A-Za-z0-9.+-]*[ /_-]v?\d+\.\d+")
_WEAK = (("NULL", "no encryption (NULL)"), ("EXP", "EXPORT-grade"), ("RC4", "RC4"),
         ("DES", "DES or 3DES"), ("MD5", "an MD5 MAC"), ("ADH", "anonymous key exchange"),
         ("AECDH", "anonymous key exchange"))


def escape(data: bytes, limits: HardwareLimits = LIMITS) -> str:
    """``data`` as printable text (``\\xNN`` for other bytes), cut to the evidence limit."""
    cut = data[:limits.net_evidence_max_bytes]
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else "\\x%02x" % b for b in cut)
    return text + ("... (%d bytes)" % len(data) if len(data) > len(cut) else "")


def parse_ports(text: str, limit: int = LIMITS.net_max_ports) -> tuple[int, ...]:
    """``"22,80-90,8883"`` as sorted unique ports (``ValueError`` saying what is wrong)."""
    ports: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_s, sep, hi_s = part.partition("-")
        if not (lo_s.isdigit() and (not sep or hi_s.isdigit())):
            raise ValueError("%r is not a port or a range of ports (22, 8000-8100)" % part)
        lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        if not 1 <= lo <= hi <= 65535:
            raise ValueError("%r is outside 1..65535 or runs backwards" % part)
        if hi - lo + 1 + len(ports) > limit:
            raise ValueError("more than %d ports" % limit)
        ports.update(range(lo, hi + 1))
    return tuple(sorted(ports))


def parse_declared(text: str, limit: int = LIMITS.net_max_ports) -> frozenset[PortSpec]:
    """``"8883,22/tcp,5684/udp"`` (TCP when no protocol is named) as port specs."""
    specs: set[PortSpec] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        port_s, _, proto = part.partition("/")
        proto = proto.lower() or "tcp"
        if proto not in ("tcp", "udp"):
            raise ValueError("%r: the protocol is tcp or udp" % part)
        specs.update((proto, p) for p in parse_ports(port_s, limit))
    return frozenset(specs)


def weak_reason(cipher: str) -> str:
    """Why a TLS 1.2 suite (OpenSSL name) is weak, or "" when it is not."""
    name = cipher.upper()
    for marker, why in _WEAK:
        if marker in name.split("-") or (marker in ("NULL", "RC4", "DES") and marker in name):
            return why
    aead = any(m in name for m in ("GCM", "CCM", "CHACHA20", "POLY1305"))
    if name.endswith("-SHA") and not aead:
        return "CBC with a SHA-1 MAC"
    return ""


def parse_connack(answer: bytes) -> int | None:
    """The return code of an MQTT 3.1.1 CONNACK at the start of ``answer``, else None."""
    if len(answer) >= 4 and answer[0] == 0x20 and answer[1] == 0x02 and answer[2] in (0, 1):
        return answer[3]
    return None


def classify(port: PortState) -> str:
    """The service a port's banner or reply shows: telnet, ftp, ssh, http or ""."""
    for b in (port.banner, port.reply):  # a slow greeting may come as the reply
        if b.startswith(b"\xff") or b"login:" in b.lower() or b"password:" in b.lower():
            return "telnet"
        if b.startswith(b"SSH-"):
            return "ssh"
        if b.startswith(b"220") and b"FTP" in b.upper():
            return "ftp"
    return "http" if port.reply.startswith(b"HTTP/") else ""


def _verdict(req: str, check: str, outcome: Outcome, reason: str, evidence: Iterable[Evidence],
             fix: str) -> Verdict:
    return Verdict(req, check, outcome, reason, tuple(evidence),
                   fix="" if outcome is Outcome.PASS else fix)


def _spec(p: PortState) -> str:
    return "%d/%s" % (p.port, p.proto)


def _reachable(cap: NetCapture) -> bool:
    return any(p.state in ("open", "closed") for p in cap.ports if p.proto == "tcp")


def _check_ports(cap: NetCapture, declared: frozenset[PortSpec]) -> Verdict:
    tcp_seen = [p for p in cap.ports if p.proto == "tcp"]
    udp = [p for p in cap.ports if p.proto == "udp"]
    icmp_works = any(p.state == "closed" for p in udp)
    errors = [p for p in cap.ports if p.state == "error"]
    open_ = [p for p in cap.ports if p.state == "open"
             or (p.state == "silent" and icmp_works)]
    extra = [p for p in open_ if (p.proto, p.port) not in declared]
    ev = [Evidence(_spec(p), p.state, "not declared" if p in extra else "declared")
          for p in open_]
    if extra:
        return _verdict(REQ_PORTS, "open-ports", Outcome.FAIL,
                        "%d open port(s) not on the declared list: %s"
                        % (len(extra), ", ".join(_spec(p) for p in extra)), ev, _FIX_PORTS)
    if tcp_seen and not _reachable(cap):
        return _verdict(REQ_PORTS, "open-ports", Outcome.UNDECIDED,
                        "the host answered on none of %d TCP ports (every connect timed out or "
                        "failed): it may be off or unreachable" % len(tcp_seen),
                        [Evidence(_spec(p), p.state, p.detail) for p in tcp_seen[:5]],
                        _FIX_UNDECIDED)
    if errors:
        return _verdict(REQ_PORTS, "open-ports", Outcome.UNDECIDED,
                        "%d port(s) could not be probed: %s" % (len(errors), errors[0].detail),
                        [Evidence(_spec(p), p.state, p.detail) for p in errors[:5]],
                        _FIX_UNDECIDED)
    silent = [p for p in udp if p.state == "silent"]
    if silent and not icmp_works:
        return _verdict(REQ_PORTS, "open-ports", Outcome.UNDECIDED,
                        "no UDP port answered or was refused (%d silent): the host drops "
                        "UDP probes, so open UDP ports cannot be told apart" % len(silent),
                        [Evidence(_spec(p), p.state) for p in silent[:5]],
                        "let the host answer closed UDP ports with ICMP port unreachable "
                        "while it is probed, or list its UDP services as evidence")
    return _verdict(REQ_PORTS, "open-ports", Outcome.PASS,
                    "%d open port(s), all declared, of %d TCP and %d UDP probed"
                    % (len(open_), len(cap.tcp_ports), len(cap.udp_ports)), ev, "")


def _check_clear_text(cap: NetCapture) -> Verdict:
    found: list[Evidence] = []
    for p in cap.open_ports():
        listed = CLEAR_TEXT.get((p.proto, p.port))
        if listed:
            found.append(Evidence(_spec(p), "open", "%s port" % listed))
        service = classify(p)
        if service in ("telnet", "ftp"):
            found.append(Evidence(_spec(p), escape(p.banner or p.reply),
                                  "a %s greeting" % service))
        elif service == "http":
            found.append(Evidence(_spec(p), escape(p.reply), "HTTP without TLS"))
    for m in cap.mqtt:
        if m.transport == "tcp" and parse_connack(m.answer) is not None:
            found.append(Evidence("%d/tcp" % m.port, escape(m.answer), "MQTT without TLS"))
    if found:
        where = sorted({e.field for e in found})
        return _verdict(REQ_CLEAR_TEXT, "clear-text", Outcome.FAIL,
                        "clear text on %d port(s): %s" % (len(where), "; ".join(
                            "%s %s" % (w, ", ".join(sorted({e.note for e in found
                                                            if e.field == w})))
                            for w in where[:4])), found, _FIX_CLEAR)
    if cap.tcp_ports and not _reachable(cap):
        return _verdict(REQ_CLEAR_TEXT, "clear-text", Outcome.UNDECIDED,
                        "the host answered on no TCP port", (), _FIX_UNDECIDED)
    return _verdict(REQ_CLEAR_TEXT, "clear-text", Outcome.PASS,
                    "no clear-text service among %d open port(s)" % len(cap.open_ports()),
                    [Evidence(_spec(p), "open", classify(p) or "no clear-text behaviour")
                     for p in cap.open_ports()], "")


def _tells_version(data: bytes) -> bool:
    if data.startswith(b"SSH-"):
        line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        return b" " in line.strip()  # comments after the software version
    if data.startswith(b"HTTP/"):
        data = data.partition(b" ")[2]  # the protocol's version, not the software's
    return _VERSION.search(data) is not None


def _check_banners(cap: NetCapture) -> Verdict:
    telling = [(p, data) for p in cap.open_ports() for data in (p.banner, p.reply)
               if data and _tells_version(data)]
    if telling:
        return _verdict(REQ_BANNER, "service-banner", Outcome.FAIL,
                        "%d banner(s) name software and its version"
                        % len(telling), [Evidence(_spec(p), escape(d)) for p, d in telling],
                        _FIX_BANNER)
    if cap.tcp_ports and not _reachable(cap):
        return _verdict(REQ_BANNER, "service-banner", Outcome.UNDECIDED,
                        "the host answered on no TCP port", (), _FIX_UNDECIDED)
    said = [p for p in cap.open_ports() if p.banner or p.reply]
    return _verdict(REQ_BANNER, "service-banner", Outcome.PASS,
                    "no banner names a version (%d of %d open port(s) said something)"
                    % (len(said), len(cap.open_ports())),
                    [Evidence(_spec(p), escape(p.banner or p.reply)) for p in said], "")


def _no_tls(check: str) -> Verdict:
    return _verdict(REQ_TLS, check, Outcome.UNDECIDED,
                    "no scanned port answered a TLS handshake: a device that serves nothing "
                    "is a TLS client, checked by the tls-mitm probe, not by a scan", (),
                    "if the device serves TLS, name its port with --ports; otherwise give "
                    "the tls-mitm evidence (docs/VENDOR_GUIDE.md, 'Network')")


def _check_versions(endpoints: Sequence[TlsEndpoint]) -> Verdict:
    bad: list[Evidence] = []
    unsure: list[Evidence] = []
    ev: list[Evidence] = []
    for t in endpoints:
        for h in t.handshakes:
            e = Evidence("%d/tcp %s" % (t.port, h.version), h.result,
                         h.cipher or h.detail)
            ev.append(e)
            if h.version in TLS_BELOW_12 and h.result == "accepted":
                bad.append(e)
            elif h.version in TLS_BELOW_12 and h.result in ("untestable", "error"):
                unsure.append(e)
        if not any(h.result == "accepted" and h.version not in TLS_BELOW_12
                   for h in t.handshakes) and not bad:
            unsure.append(Evidence("%d/tcp" % t.port, "no TLS 1.2 or 1.3 handshake accepted"))
    if bad:
        return _verdict(REQ_TLS, "tls-versions", Outcome.FAIL,
                        "%s accepted below TLS 1.2" % ", ".join(e.field for e in bad), ev,
                        _FIX_TLS)
    if unsure:
        return _verdict(REQ_TLS, "tls-versions", Outcome.UNDECIDED,
                        "%s: %s" % (unsure[0].field, unsure[0].note or unsure[0].raw), ev,
                        _FIX_UNDECIDED)
    return _verdict(REQ_TLS, "tls-versions", Outcome.PASS,
                    "%d TLS endpoint(s) accept TLS 1.2 or later only" % len(endpoints), ev, "")


def _check_ciphers(endpoints: Sequence[TlsEndpoint]) -> Verdict:
    bad: list[Evidence] = []
    ev: list[Evidence] = []
    untested: list[int] = []
    for t in endpoints:
        chosen = {(h.version, h.cipher) for h in t.handshakes
                  if h.result == "accepted" and h.version != "TLSv1.3" and h.cipher}
        for version, c in sorted(chosen | {("TLSv1.2", w) for w in t.weak_accepted}):
            why = weak_reason(c)
            e = Evidence("%d/tcp %s" % (t.port, version), c, why or "strong")
            ev.append(e)
            if why:
                bad.append(e)
        if any(v == "TLSv1.2" for v, _ in chosen) and not t.weak_offered:
            untested.append(t.port)
    if bad:
        return _verdict(REQ_TLS, "tls-ciphers", Outcome.FAIL,
                        "weak suite(s) accepted: %s" % ", ".join(
                            "%s (%s)" % (e.raw, e.note) for e in bad[:4]), ev, _FIX_CIPHERS)
    if untested:
        return _verdict(REQ_TLS, "tls-ciphers", Outcome.UNDECIDED,
                        "no weak suite could be offered to port(s) %s (this OpenSSL has none)"
                        % ", ".join(map(str, untested)), ev, _FIX_UNDECIDED)
    return _verdict(REQ_TLS, "tls-ciphers", Outcome.PASS,
                    "no weak suite accepted (%d offered per endpoint)"
                    % max((len(t.weak_offered) for t in endpoints), default=0), ev, "")


def _when(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _key_problem(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return "an RSA key of %d bits (at least %d)" % (key.key_size, MIN_RSA_BITS)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.key_size < MIN_EC_BITS:
        return "an EC key of %d bits (at least %d)" % (key.key_size, MIN_EC_BITS)
    if isinstance(key, dsa.DSAPublicKey):
        return "a DSA key"
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey,
                            ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "a key of an unknown type"
    return ""


def _names_host(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    want = host.lower().rstrip(".")
    for name in san.get_values_for_type(x509.DNSName):
        name = name.lower().rstrip(".")
        if name == want or (name.startswith("*.") and "." in want
                            and want.split(".", 1)[1] == name[2:]):
            return True
    return False


def certificate_problems(der: bytes, host: str, now: dt.datetime) -> list[str]:
    """What is wrong with a server certificate for ``host`` at ``now`` ([] when nothing)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        problems = []
        if now > cert.not_valid_after_utc:
            problems.append("expired on %s" % cert.not_valid_after_utc.isoformat())
        if now < cert.not_valid_before_utc:
            problems.append("not valid before %s" % cert.not_valid_before_utc.isoformat())
        if cert.issuer == cert.subject:
            problems.append("self-signed (issuer = subject = %s)" % cert.subject.rfc4514_string())
        key = _key_problem(cert)
        if key:
            problems.append(key)
        algo = cert.signature_hash_algorithm
        if isinstance(algo, (hashes.MD5, hashes.SHA1)):
            problems.append("signed with %s" % algo.name.upper())
        if not _names_host(cert, host):
            problems.append("its subjectAltName does not name %s" % host)
    except (ValueError, TypeError) as e:
        return ["not a certificate this probe can read (%s)" % e]
    return problems


def _check_certificates(cap: NetCapture, endpoints: Sequence[TlsEndpoint]) -> Verdict:
    now = _when(cap.scanned_at)
    if now is None:
        return _verdict(REQ_TLS, "tls-certificate", Outcome.UNDECIDED,
                        "the scan's time %r is not an ISO 8601 time" % cap.scanned_at[:40], (),
                        _FIX_UNDECIDED)
    bad: list[Evidence] = []
    ev: list[Evidence] = []
    missing: list[int] = []
    for t in endpoints:
        if not t.certificate:
            missing.append(t.port)
            continue
        problems = certificate_problems(t.certificate, cap.host, now)
        e = Evidence("%d/tcp certificate" % t.port, "; ".join(problems) or "valid",
                     "%d bytes DER" % len(t.certificate))
        ev.append(e)
        if problems:
            bad.append(e)
    if bad:
        return _verdict(REQ_TLS, "tls-certificate", Outcome.FAIL,
                        "%s: %s" % (bad[0].field, bad[0].raw), ev, _FIX_CERT)
    if missing:
        return _verdict(REQ_TLS, "tls-certificate", Outcome.UNDECIDED,
                        "no certificate was seen on port(s) %s" % ", ".join(map(str, missing)),
                        ev, _FIX_UNDECIDED)
    return _verdict(REQ_TLS, "tls-certificate", Outcome.PASS,
                    "%d certificate(s): valid, not self-signed, naming %s, strong keys"
                    % (len(ev), cap.host), ev, "")


def _attempt_evidence(m: MqttAttempt) -> Evidence:
    rc = parse_connack(m.answer)
    what = ("CONNACK return code %d" % rc if rc is not None
            else escape(m.answer) if m.answer else m.result)
    return Evidence("%d/%s MQTT CONNECT, no credentials" % (m.port, m.transport), what,
                    m.detail)


def _mqtt_unsure(cap: NetCapture) -> list[MqttAttempt]:
    return [m for m in cap.mqtt if m.named and m.result in ("timeout", "error", "closed")
            and parse_connack(m.answer) is None]


def _check_anonymous(cap: NetCapture) -> Verdict:
    accepted = [m for m in cap.mqtt if parse_connack(m.answer) == 0]
    ev = [_attempt_evidence(m) for m in cap.mqtt
          if m.named or parse_connack(m.answer) is not None or m.result == "tls-refused"]
    if accepted:
        return _verdict(REQ_AUTH, "mqtt-anonymous", Outcome.FAIL,
                        "a broker let in a client without credentials on port(s) %s"
                        % ", ".join("%d/%s" % (m.port, m.transport) for m in accepted), ev,
                        _FIX_ANON)
    undecided = _mqtt_undecided(cap, REQ_AUTH, "mqtt-anonymous", ev)
    if undecided is not None:
        return undecided
    if not ev:
        return _verdict(REQ_AUTH, "mqtt-anonymous", Outcome.PASS,
                        "no MQTT broker listens on the scanned ports", (), "")
    return _verdict(REQ_AUTH, "mqtt-anonymous", Outcome.PASS,
                    "every MQTT broker refused a client without credentials", ev, "")


def _mqtt_undecided(cap: NetCapture, req: str, check: str, ev: list[Evidence]
                    ) -> Verdict | None:
    """Both MQTT checks cannot decide when a named MQTT port did not answer a CONNECT, or
    when the host answered on no TCP port at all."""
    unsure = _mqtt_unsure(cap)
    if unsure:
        return _verdict(req, check, Outcome.UNDECIDED,
                        "the MQTT port %d did not answer a CONNECT (%s)"
                        % (unsure[0].port, unsure[0].detail or unsure[0].result), ev,
                        _FIX_UNDECIDED)
    if cap.tcp_ports and not _reachable(cap):
        return _verdict(req, check, Outcome.UNDECIDED, "the host answered on no TCP port",
                        (), _FIX_UNDECIDED)
    return None


def _check_client_cert(cap: NetCapture) -> Verdict:
    let_in = [m for m in cap.mqtt if parse_connack(m.answer) is not None]
    ev = [_attempt_evidence(m) for m in cap.mqtt
          if m.named or parse_connack(m.answer) is not None or m.result == "tls-refused"]
    if let_in:
        m = let_in[0]
        how = "plain TCP" if m.transport == "tcp" else "TLS without a client certificate"
        return _verdict(REQ_CERT_AUTH, "mqtt-client-cert", Outcome.FAIL,
                        "the broker on port %d speaks MQTT to a client over %s: it cannot "
                        "be authenticating devices by certificate" % (m.port, how), ev,
                        _FIX_CERT_AUTH)
    undecided = _mqtt_undecided(cap, REQ_CERT_AUTH, "mqtt-client-cert", ev)
    if undecided is not None:
        return undecided
    refused = [m for m in cap.mqtt if m.result == "tls-refused"]
    if not refused:
        return _verdict(REQ_CERT_AUTH, "mqtt-client-cert", Outcome.PASS,
                        "no MQTT broker listens on the scanned ports", ev, "")
    return _verdict(REQ_CERT_AUTH, "mqtt-client-cert", Outcome.PASS,
                    "%d TLS port(s) refused a client without a certificate; no broker "
                    "answered MQTT without one" % len(refused), ev, "")


def check_capture(cap: NetCapture, declared: Iterable[PortSpec] = ()) -> list[Verdict]:
    """Every network verdict for one scan (rules in the module docstring), in a fixed order."""
    declared_set = frozenset(declared)
    verdicts = [_check_ports(cap, declared_set), _check_clear_text(cap), _check_banners(cap)]
    if cap.tls:
        verdicts += [_check_versions(cap.tls), _check_ciphers(cap.tls),
                     _check_certificates(cap, cap.tls)]
    else:
        verdicts.append(_no_tls("tls-versions"))
    verdicts += [_check_anonymous(cap), _check_client_cert(cap)]
    return verdicts
