"""The network rules on captures (no network): each rule both ways, the edge cases that
cannot be decided, and property tests for the parsers of untrusted input (port lists, a
saved scan, a TLS server's flight, a CONNACK) and for the rule set."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from cityedge_hardware.errors import NetDataError
from cityedge_hardware.net_capture import (
    HANDSHAKE_RESULTS,
    MQTT_RESULTS,
    PORT_STATES,
    TLS_VERSIONS,
    Handshake,
    MqttAttempt,
    NetCapture,
    PortState,
    TlsEndpoint,
    from_json,
)
from cityedge_hardware.net_rules import (
    CLEAR_TEXT,
    certificate_problems,
    check_capture,
    parse_connack,
    parse_declared,
    parse_ports,
    weak_reason,
)
from cityedge_hardware.tls_flight import read_flight
from cityedge_hardware.verdict import Outcome, Verdict

NOW = dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.UTC)
CHECKS = ["open-ports", "clear-text", "service-banner", "tls-versions", "tls-ciphers",
          "tls-certificate", "mqtt-anonymous", "mqtt-client-cert"]


def _cert(*, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
          self_signed: bool = False, days: int = 30, start_days: int = -1,
          san: str | None = "127.0.0.1") -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    ca_key = key if self_signed else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    issuer = subject if self_signed else x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "city CA")])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW + dt.timedelta(days=start_days))
         .not_valid_after(NOW + dt.timedelta(days=days)))
    if san is not None:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(san))
        except ValueError:
            name = x509.DNSName(san)
        b = b.add_extension(x509.SubjectAlternativeName([name]), critical=False)
    from cryptography.hazmat.primitives.serialization import Encoding
    return b.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.DER)


GOOD_CERT = _cert()


def _tls(port: int = 8883, versions: dict[str, str] | None = None,
         weak_offered: tuple[str, ...] = ("ECDHE-ECDSA-AES128-SHA",),
         weak_accepted: tuple[str, ...] = (), cert: bytes = GOOD_CERT) -> TlsEndpoint:
    versions = versions or {"TLSv1": "refused", "TLSv1.1": "refused",
                            "TLSv1.2": "accepted", "TLSv1.3": "accepted"}
    suites = {"TLSv1.2": "ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.3": "TLS_AES_256_GCM_SHA384",
              "TLSv1": "ECDHE-ECDSA-AES256-SHA", "TLSv1.1": "ECDHE-ECDSA-AES256-SHA"}
    return TlsEndpoint(port, tuple(Handshake(v, r, suites[v] if r == "accepted" else "")
                                   for v, r in versions.items()),
                       weak_offered, weak_accepted, cert)


def _capture(ports: tuple[PortState, ...] = (), tls: tuple[TlsEndpoint, ...] = (),
             mqtt: tuple[MqttAttempt, ...] = (), udp: tuple[int, ...] = ()) -> NetCapture:
    tcp = tuple(sorted({p.port for p in ports if p.proto == "tcp"} | {8883}))
    states = {(p.proto, p.port) for p in ports}
    filled = ports + tuple(PortState("tcp", p, "closed") for p in tcp
                           if ("tcp", p) not in states)
    return NetCapture("127.0.0.1", NOW.isoformat(), tcp, udp, filled, tls, mqtt)


HARDENED = _capture((PortState("tcp", 8883, "open"),), (_tls(),),
                    (MqttAttempt(8883, "tls", "tls-refused",
                                 detail="CONNECT: TLS: TLSV13_ALERT_CERTIFICATE_REQUIRED",
                                 named=True),))


def _by_check(verdicts: list[Verdict]) -> dict[str, Verdict]:
    return {v.check: v for v in verdicts}


def test_a_hardened_broker_capture_passes_every_check() -> None:
    verdicts = check_capture(HARDENED, [("tcp", 8883)])
    assert [v.check for v in verdicts] == CHECKS
    assert {v.outcome for v in verdicts} == {Outcome.PASS}
    assert all(v.fix == "" for v in verdicts)


def test_an_undeclared_port_fails_and_declaring_it_passes() -> None:
    assert _by_check(check_capture(HARDENED))["open-ports"].outcome is Outcome.FAIL
    v = _by_check(check_capture(HARDENED, parse_declared("8883/tcp")))["open-ports"]
    assert v.outcome is Outcome.PASS


@pytest.mark.parametrize(("port", "what"), sorted(
    ((p, w) for (proto, p), w in CLEAR_TEXT.items() if proto == "tcp")))
def test_every_clear_text_port_fails_even_when_declared(port: int, what: str) -> None:
    cap = _capture((PortState("tcp", port, "open"),))
    v = _by_check(check_capture(cap, [("tcp", port)]))["clear-text"]
    assert v.outcome is Outcome.FAIL
    assert what in v.reason


@pytest.mark.parametrize(("banner", "reply", "clear", "tells"), [
    (b"\xff\xfb\x01\xff\xfb\x03login: ", b"", True, False),
    (b"220 ProFTPD 1.3.5 Server (FTP) ready\r\n", b"", True, True),
    (b"", b"HTTP/1.0 200 OK\r\nServer: MicroWebSrv/1.0\r\n", True, True),
    (b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", True, False),
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", b"", False, True),
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", b"", False, False),
    (b"", b"220 FTP server ready\r\n", True, False),  # a greeting too slow for the banner
    (b"", b"", False, False),
])
def test_services_are_judged_by_what_they_say(banner: bytes, reply: bytes, clear: bool,
                                              tells: bool) -> None:
    cap = _capture((PortState("tcp", 4000, "open", banner=banner, reply=reply),))
    by = _by_check(check_capture(cap, [("tcp", 4000)]))
    assert by["clear-text"].outcome is (Outcome.FAIL if clear else Outcome.PASS)
    assert by["service-banner"].outcome is (Outcome.FAIL if tells else Outcome.PASS)


def test_tls_below_1_2_fails_and_an_untestable_old_version_cannot_be_decided() -> None:
    old = _tls(versions={"TLSv1": "accepted", "TLSv1.1": "refused", "TLSv1.2": "refused",
                         "TLSv1.3": "refused"})
    by = _by_check(check_capture(_capture((PortState("tcp", 8883, "open"),), (old,))))
    assert by["tls-versions"].outcome is Outcome.FAIL
    assert "8883/tcp TLSv1 accepted below TLS 1.2" in by["tls-versions"].reason
    assert by["tls-ciphers"].outcome is Outcome.FAIL  # its TLS 1.0 suite is CBC-SHA1
    unsure = _tls(versions={"TLSv1": "untestable", "TLSv1.1": "refused",
                            "TLSv1.2": "accepted", "TLSv1.3": "accepted"})
    by = _by_check(check_capture(_capture((PortState("tcp", 8883, "open"),), (unsure,))))
    assert by["tls-versions"].outcome is Outcome.UNDECIDED


def test_weak_suites_fail_and_unoffered_ones_cannot_be_decided() -> None:
    weak = _tls(weak_accepted=("ECDHE-ECDSA-AES128-SHA",))
    v = _by_check(check_capture(_capture((PortState("tcp", 8883, "open"),), (weak,))))
    assert v["tls-ciphers"].outcome is Outcome.FAIL
    assert "CBC with a SHA-1 MAC" in v["tls-ciphers"].reason
    none_offered = _tls(weak_offered=())
    v = _by_check(check_capture(_capture((PortState("tcp", 8883, "open"),), (none_offered,))))
    assert v["tls-ciphers"].outcome is Outcome.UNDECIDED


@pytest.mark.parametrize("name", ["NULL-SHA", "ECDHE-RSA-NULL-SHA", "EXP-RC4-MD5", "RC4-SHA",
                                  "DES-CBC3-SHA", "ADH-AES128-GCM-SHA256", "AECDH-AES256-SHA",
                                  "ECDHE-RSA-AES128-SHA", "AES256-SHA", "NULL-MD5"])
def test_weak_suites_are_named_weak(name: str) -> None:
    assert weak_reason(name)


def test_no_aead_or_tls13_suite_of_this_openssl_is_called_weak() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM")
    names = [str(c["name"]) for c in ctx.get_ciphers()]
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in names and "TLS_AES_256_GCM_SHA384" in names
    assert [n for n in names if weak_reason(n)] == []


@pytest.mark.parametrize(("der", "problem"), [
    (_cert(days=-1, start_days=-30), "expired"),
    (_cert(start_days=2), "not valid before"),
    (_cert(self_signed=True), "self-signed"),
    (_cert(key=rsa.generate_private_key(public_exponent=65537, key_size=1024)),
     "an RSA key of 1024 bits"),
    (_cert(key=ec.generate_private_key(ec.SECP192R1())), "an EC key of 192 bits"),
    (_cert(san="10.0.0.9"), "does not name 127.0.0.1"),
    (_cert(san=None), "does not name 127.0.0.1"),
    (b"\x30\x03\x02\x01\x00", "not a certificate"),
])
def test_each_certificate_problem_is_found(der: bytes, problem: str) -> None:
    problems = certificate_problems(der, "127.0.0.1", NOW)
    assert any(problem in p for p in problems), problems
    cap = _capture((PortState("tcp", 8883, "open"),), (_tls(cert=der),))
    assert _by_check(check_capture(cap))["tls-certificate"].outcome is Outcome.FAIL


def test_a_sha1_signature_is_found(tmp_path: Path) -> None:
    # cryptography refuses to sign with SHA-1; OpenSSL's command line still does
    subprocess.run(["openssl", "req", "-x509", "-sha1", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.der"),
                    "-outform", "DER", "-subj", "/CN=old", "-days", "9999",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    problems = certificate_problems((tmp_path / "c.der").read_bytes(), "127.0.0.1", NOW)
    assert "signed with SHA1" in problems


def test_a_good_certificate_for_a_name_or_a_wildcard_has_no_problem() -> None:
    assert certificate_problems(GOOD_CERT, "127.0.0.1", NOW) == []
    assert certificate_problems(_cert(san="gw1.city.example"), "gw1.city.example", NOW) == []
    assert certificate_problems(_cert(san="*.city.example"), "gw1.city.example", NOW) == []
    assert certificate_problems(_cert(san="*.city.example"), "a.b.city.example", NOW) != []


def test_mqtt_without_credentials_both_ways() -> None:
    def by(*attempts: MqttAttempt) -> dict[str, Verdict]:
        return _by_check(check_capture(_capture((PortState("tcp", 8883, "open"),), (_tls(),),
                                                attempts), [("tcp", 8883)]))

    anon = by(MqttAttempt(1883, "tcp", "answered", b"\x20\x02\x00\x00", named=True))
    assert anon["mqtt-anonymous"].outcome is Outcome.FAIL
    assert anon["mqtt-client-cert"].outcome is Outcome.FAIL
    assert anon["clear-text"].outcome is Outcome.FAIL
    password = by(MqttAttempt(8883, "tls", "answered", b"\x20\x02\x00\x05", named=True))
    assert password["mqtt-anonymous"].outcome is Outcome.PASS  # not authorized
    assert password["mqtt-client-cert"].outcome is Outcome.FAIL  # but in without a cert
    silent = by(MqttAttempt(8883, "tls", "timeout", detail="CONNECT: timed out", named=True))
    assert silent["mqtt-anonymous"].outcome is Outcome.UNDECIDED
    assert "timed out" in silent["mqtt-anonymous"].reason
    unnamed = by(MqttAttempt(9000, "tcp", "answered", b"HTTP/1.1 400"))
    assert unnamed["mqtt-anonymous"].outcome is Outcome.PASS  # not a broker


def test_a_host_that_answers_nothing_cannot_be_decided() -> None:
    dark = NetCapture("10.0.0.9", NOW.isoformat(), (22, 8883), (),
                      (PortState("tcp", 22, "filtered", "no answer in 1.0 s"),
                       PortState("tcp", 8883, "error", "EHOSTUNREACH: No route to host")))
    by = _by_check(check_capture(dark))
    for check in ("open-ports", "clear-text", "service-banner", "tls-versions",
                  "mqtt-anonymous", "mqtt-client-cert"):
        assert by[check].outcome is Outcome.UNDECIDED, check
    assert "may be off" in by["open-ports"].reason


def test_udp_silence_counts_as_open_only_when_the_host_refuses_other_udp_ports() -> None:
    silent = PortState("udp", 5353, "silent", "no answer in 0.5 s")
    refused = PortState("udp", 53, "closed", "ICMP port unreachable")
    alone = _capture((PortState("tcp", 8883, "open"), silent), udp=(5353,))
    assert _by_check(check_capture(alone, [("tcp", 8883)]))["open-ports"].outcome \
        is Outcome.UNDECIDED
    both = _capture((PortState("tcp", 8883, "open"), silent, refused), udp=(53, 5353))
    v = _by_check(check_capture(both, [("tcp", 8883)]))["open-ports"]
    assert v.outcome is Outcome.FAIL and "5353/udp" in v.reason
    v = _by_check(check_capture(both, [("tcp", 8883), ("udp", 5353)]))["open-ports"]
    assert v.outcome is Outcome.PASS


# --- parsers of untrusted input -----------------------------------------------------------

@given(st.sets(st.integers(1, 65535), max_size=40))
def test_port_lists_round_trip(ports: set[int]) -> None:
    assert parse_ports(",".join(map(str, ports))) == tuple(sorted(ports))


@given(st.text(max_size=40))
def test_any_port_text_is_ports_or_a_value_error(text: str) -> None:
    try:
        ports = parse_ports(text)
    except ValueError:
        return
    assert all(1 <= p <= 65535 for p in ports) and list(ports) == sorted(set(ports))


def test_port_lists_are_capped_and_checked() -> None:
    assert parse_ports("22, 8000-8002") == (22, 8000, 8001, 8002)
    for bad in ("0", "70000", "90-80", "ssh", "1-2000", "22/tcp"):
        with pytest.raises(ValueError):
            parse_ports(bad)
    assert parse_declared("8883,5684/udp,22/TCP") == {("tcp", 8883), ("udp", 5684),
                                                        ("tcp", 22)}
    with pytest.raises(ValueError):
        parse_declared("53/sctp")


@given(st.binary(max_size=64))
def test_connack_parsing_never_raises(data: bytes) -> None:
    rc = parse_connack(data)
    assert rc is None or (data[:2] == b"\x20\x02" and rc == data[3])


def _server_hello(legacy: int, cipher: int, sid: bytes, version_ext: int | None) -> bytes:
    ext = b""
    if version_ext is not None:
        ext = b"\x00\x2b\x00\x02" + version_ext.to_bytes(2, "big")
    body = (legacy.to_bytes(2, "big") + bytes(32) + bytes([len(sid)]) + sid
            + cipher.to_bytes(2, "big") + b"\x00" + len(ext).to_bytes(2, "big") + ext)
    msg = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + len(msg).to_bytes(2, "big") + msg


@given(st.sampled_from([0x0301, 0x0302, 0x0303]), st.integers(0, 0xFFFF),
       st.binary(max_size=32), st.sampled_from([None, 0x0304]))
def test_a_server_hello_is_read_whatever_its_fields(legacy: int, cipher: int, sid: bytes,
                                                    ext: int | None) -> None:
    flight = read_flight(_server_hello(legacy, cipher, sid, ext))
    want = {0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
    assert flight.version == want[ext or legacy]
    assert flight.cipher == cipher and flight.fault == ""


@given(st.binary(max_size=300), st.integers(0, 200))
def test_a_flight_of_any_bytes_or_cut_short_never_raises(data: bytes, cut: int) -> None:
    read_flight(data)
    hello = _server_hello(0x0303, 0xC02B, b"\x01" * 32, None)
    cut_short = read_flight(hello[:cut])
    assert cut_short.version == "" or cut >= len(hello) - 6 or cut_short.fault


def test_an_alert_and_a_certificate_request_are_seen() -> None:
    assert read_flight(b"\x15\x03\x01\x00\x02\x02\x46").alert == "protocol_version"
    req = b"\x0d\x00\x00\x04\x01\x40\x00\x00"
    flight = read_flight(_server_hello(0x0303, 0xC02B, b"", None)
                         + b"\x16\x03\x03" + len(req).to_bytes(2, "big") + req)
    assert flight.version == "TLSv1.2" and flight.client_cert_requested


# --- the capture as JSON -----------------------------------------------------------------

_text = st.text(max_size=30)
_port = st.integers(1, 65535)
_port_states = st.builds(PortState, st.sampled_from(["tcp", "udp"]), _port,
                         st.sampled_from(PORT_STATES), _text, st.binary(max_size=40),
                         st.binary(max_size=40))
_handshakes = st.builds(Handshake, st.sampled_from(TLS_VERSIONS),
                        st.sampled_from(HANDSHAKE_RESULTS), _text, _text)
_endpoints = st.builds(TlsEndpoint, _port, st.lists(_handshakes, max_size=4).map(tuple),
                       st.lists(_text, max_size=3).map(tuple),
                       st.lists(_text, max_size=3).map(tuple),
                       st.sampled_from([b"", GOOD_CERT, b"\x30\x00"]), st.booleans())
_attempts = st.builds(MqttAttempt, _port, st.sampled_from(["tcp", "tls"]),
                      st.sampled_from(MQTT_RESULTS),
                      st.sampled_from([b"", b"\x20\x02\x00\x00", b"\x20\x02\x00\x05",
                                       b"HTTP/1.1"]), _text, st.booleans())
captures = st.builds(NetCapture, st.sampled_from(["127.0.0.1", "gw.local"]),
                     st.sampled_from([NOW.isoformat(), "2026-12-04T10:00:00Z", "not a time"]),
                     st.lists(_port, max_size=5).map(tuple),
                     st.lists(_port, max_size=5).map(tuple),
                     st.lists(_port_states, max_size=6).map(tuple),
                     st.lists(_endpoints, max_size=2).map(tuple),
                     st.lists(_attempts, max_size=3).map(tuple),
                     st.lists(_text, max_size=2).map(tuple))


@given(captures)
def test_a_capture_round_trips_through_json(cap: NetCapture) -> None:
    assert from_json(cap.dumps().encode()) == cap


@given(captures, st.sets(st.tuples(st.sampled_from(["tcp", "udp"]), _port), max_size=4))
def test_the_rules_decide_every_capture_in_a_fixed_order(
        cap: NetCapture, declared: set[tuple[str, int]]) -> None:
    verdicts = check_capture(cap, declared)
    checks = [v.check for v in verdicts]
    assert checks == (CHECKS if cap.tls else [*CHECKS[:3], "tls-versions", *CHECKS[6:]])
    assert all(v.reason and (v.outcome is Outcome.PASS or v.fix) for v in verdicts)


@given(captures)
def test_declaring_every_open_port_never_fails_the_port_rule(cap: NetCapture) -> None:
    declared = {(p.proto, p.port) for p in cap.ports}
    assert _by_check(check_capture(cap, declared))["open-ports"].outcome is not Outcome.FAIL


@given(captures, _port)
def test_an_undeclared_open_tcp_port_always_fails_the_port_rule(cap: NetCapture,
                                                                port: int) -> None:
    cap = dataclasses.replace(cap, ports=(*cap.ports, PortState("tcp", port, "open")))
    declared = {(p.proto, p.port) for p in cap.ports if p.port != port}
    assert _by_check(check_capture(cap, declared))["open-ports"].outcome is Outcome.FAIL


@given(captures, st.sampled_from(sorted(CLEAR_TEXT)))
def test_an_open_clear_text_port_always_fails(cap: NetCapture, spec: tuple[str, int]) -> None:
    cap = dataclasses.replace(cap, ports=(*cap.ports, PortState(spec[0], spec[1], "open")))
    assert _by_check(check_capture(cap, [spec]))["clear-text"].outcome is Outcome.FAIL


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(schema="other/1"), "schema"),
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d["ports"][0].update(port=0), "ports[0].port"),
    (lambda d: d["ports"][0].update(state="maybe"), "ports[0].state"),
    (lambda d: d["ports"][0].update(banner="zz"), "ports[0].banner"),
    (lambda d: d["ports"][0].update(banner="00" * 300), "ports[0].banner"),
    (lambda d: d["tls"][0].update(certificate="!!"), "tls[0].certificate"),
    (lambda d: d["mqtt"][0].update(named="yes"), "mqtt[0].named"),
    (lambda d: d.update(tcp_ports=list(range(1, 2000))), "tcp_ports"),
])
def test_a_bad_saved_scan_is_refused_naming_the_field(edit: object, message: str) -> None:
    doc = json.loads(HARDENED.dumps())
    assert callable(edit)
    edit(doc)
    with pytest.raises(NetDataError) as e:
        from_json(json.dumps(doc).encode(), source="scan.json")
    assert message in str(e.value)


@given(st.binary(max_size=200))
def test_any_bytes_as_a_saved_scan_are_a_capture_or_a_net_data_error(data: bytes) -> None:
    try:
        cap = from_json(data)
    except NetDataError as e:
        assert str(e)
    else:
        assert isinstance(cap, NetCapture)


def test_a_deeply_nested_saved_scan_is_a_net_data_error() -> None:
    with pytest.raises(NetDataError):
        from_json(b"[" * 100_000)
