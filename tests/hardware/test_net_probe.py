"""The network probe against real services on loopback, each on a free port: a telnet-like
listener, ``openssl s_server`` offering only TLS 1.0, a Mosquitto letting anyone in (all
fail), and the project's own hardened broker (passes every check). Errors (a silent port, a
reset, garbage) are verdicts, never tracebacks; a public address is refused without the
flag."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Iterator

import pytest

from cityedge_hardware.errors import ScanRefused
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.net_capture import from_json
from cityedge_hardware.net_probe import Pacer, check_network, resolve_target, scan
from cityedge_hardware.net_rules import check_capture
from cityedge_hardware.verdict import Outcome, Verdict
from cityedge_host.errors import UserError

from support.mosquitto import Mosquitto, TestPKI, free_port
from support.net_services import AnonymousMosquitto, OpenSSLServer, TelnetLike, UdpEcho

HOST = "127.0.0.1"
# a silent service costs the probe its whole reply timeout, three times; on loopback a
# second is plenty for the answers that do come
QUICK = dataclasses.replace(LIMITS, net_reply_timeout_s=1.0)


def _by(verdicts: list[Verdict]) -> dict[str, Verdict]:
    return {v.check: v for v in verdicts}


def test_a_telnet_like_listener_fails() -> None:
    with TelnetLike() as telnet:
        cap = scan(HOST, tcp_ports=[telnet.port], udp_ports=[])
    by = _by(check_capture(cap, [("tcp", telnet.port)]))
    assert by["clear-text"].outcome is Outcome.FAIL
    assert "telnet greeting" in by["clear-text"].reason
    assert by["service-banner"].outcome is Outcome.FAIL  # BusyBox v1.36.1
    assert "BusyBox v1.36.1" in by["service-banner"].evidence[0].raw
    assert by["open-ports"].outcome is Outcome.PASS  # declared, yet clear text
    assert cap.tls == () and cap.mqtt == ()  # a service that speaks first gets no more


def test_openssl_s_server_offering_tls_1_0_fails_the_version_rule(pki: TestPKI) -> None:
    with OpenSSLServer(pki.server.cert_pem, pki.server.key_pem,
                       "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0") as server:
        verdicts = check_network(HOST, tcp_ports=[server.port], udp_ports=[],
                                 declared=[("tcp", server.port)])
    by = _by(verdicts)
    assert by["tls-versions"].outcome is Outcome.FAIL
    assert by["tls-versions"].reason == "%d/tcp TLSv1 accepted below TLS 1.2" % server.port
    results = {e.field.split()[-1]: e.raw for e in by["tls-versions"].evidence}
    assert results == {"TLSv1": "accepted", "TLSv1.1": "refused", "TLSv1.2": "refused",
                       "TLSv1.3": "refused"}
    assert by["tls-certificate"].outcome is Outcome.PASS  # the city CA's server cert
    assert by["clear-text"].outcome is Outcome.PASS


def test_a_mosquitto_allowing_anonymous_clients_fails() -> None:
    with AnonymousMosquitto() as broker:
        verdicts = check_network(HOST, tcp_ports=[broker.port], udp_ports=[],
                                 mqtt_ports=[broker.port], declared=[("tcp", broker.port)])
    by = _by(verdicts)
    assert by["mqtt-anonymous"].outcome is Outcome.FAIL
    assert by["mqtt-anonymous"].evidence[0].raw == "CONNACK return code 0"
    assert by["mqtt-client-cert"].outcome is Outcome.FAIL
    assert "plain TCP" in by["mqtt-client-cert"].reason
    assert by["clear-text"].outcome is Outcome.FAIL
    assert "MQTT without TLS" in by["clear-text"].reason


def test_the_projects_hardened_broker_passes_every_check(mosquitto: Mosquitto) -> None:
    cap = scan(HOST, tcp_ports=[mosquitto.port], udp_ports=[], mqtt_ports=[mosquitto.port])
    verdicts = check_capture(cap, [("tcp", mosquitto.port)])
    assert [(v.check, v.outcome) for v in verdicts if v.outcome is not Outcome.PASS] == []
    assert len(verdicts) == 8
    (endpoint,) = cap.tls
    accepted = {h.version for h in endpoint.handshakes if h.result == "accepted"}
    assert accepted == {"TLSv1.2", "TLSv1.3"}
    assert endpoint.client_cert_requested
    assert len(endpoint.weak_offered) >= 10 and endpoint.weak_accepted == ()
    (attempt,) = cap.mqtt
    # TLS 1.3: the client's handshake ends before the server checks; the server's alert
    # (certificate required) or its close comes at the first read, after the CONNECT
    assert attempt.result == "tls-refused" and attempt.detail.startswith("CONNECT: TLS:")
    # the saved scan decides the same on replay
    assert check_capture(from_json(cap.dumps().encode()), [("tcp", mosquitto.port)]) \
        == verdicts


class _Misbehaving:
    """A listener per behaviour: ``silent`` (accepts, says nothing), ``reset`` (accepts
    and resets), ``garbage`` (answers anything with noise)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                                b"\x00\x00\x00\x00")
                conn.close()
            elif self.behaviour == "garbage":
                try:
                    conn.settimeout(1.0)
                    if conn.recv(64):
                        conn.sendall(b"\x00\xffnot a protocol\x07" * 4)
                except OSError:
                    pass
                conn.close()
            else:
                self.conns.append(conn)  # held open, never answered

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes ``_serve``'s accept (a close does not)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture(params=["silent", "reset", "garbage"])
def misbehaving(request: pytest.FixtureRequest) -> Iterator[_Misbehaving]:
    server = _Misbehaving(request.param)
    yield server
    server.close()


def test_a_misbehaving_named_mqtt_port_is_a_clear_verdict(misbehaving: _Misbehaving) -> None:
    port = misbehaving.port
    verdicts = check_network(HOST, tcp_ports=[port], udp_ports=[], mqtt_ports=[port],
                             declared=[("tcp", port)], limits=QUICK)
    by = _by(verdicts)
    assert by["open-ports"].outcome is Outcome.PASS
    mqtt = by["mqtt-anonymous"]
    if misbehaving.behaviour == "garbage":
        assert mqtt.outcome is Outcome.PASS  # it answered, and not with a CONNACK
    else:
        assert mqtt.outcome is Outcome.UNDECIDED
        assert mqtt.reason.startswith("the MQTT port %d did not answer a CONNECT" % port)
        assert mqtt.fix


def test_udp_answers_and_refusals_are_told_apart() -> None:
    closed = free_port()  # a TCP port number just freed: nothing listens on it over UDP
    with UdpEcho() as echo:
        cap = scan(HOST, tcp_ports=[], udp_ports=[echo.port, closed])
    states = {p.port: p for p in cap.ports}
    assert states[echo.port].state == "open" and states[echo.port].reply == b"echo:\r\n"
    assert states[closed].state == "closed"
    v = _by(check_capture(cap, [("udp", echo.port)]))["open-ports"]
    assert v.outcome is Outcome.PASS


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "100.64.0.1"])
def test_a_public_address_is_refused_without_the_flag(address: str) -> None:
    with pytest.raises(ScanRefused) as e:
        scan(address, tcp_ports=[80], udp_ports=[])
    assert "--allow-public" in str(e.value)
    # with the flag the gate opens (no port asked for: nothing is sent)
    assert scan(address, tcp_ports=[], udp_ports=[], allow_public=True).ports == ()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.9",
                                     "192.168.1.50", "fd00::5", "169.254.10.20", "localhost"])
def test_vendor_controlled_addresses_are_allowed(address: str) -> None:
    assert resolve_target(address)


def test_the_rate_is_capped_without_looking_at_a_real_clock() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pacer = Pacer(5.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(11):
        pacer.wait()
    assert now[0] - 100.0 == pytest.approx(2.0)  # 11 attempts at 5 a second: 2 s
    assert len(slept) == 10


def test_the_port_count_is_capped() -> None:
    with pytest.raises(UserError) as e:
        scan(HOST, tcp_ports=range(1, LIMITS.net_max_ports + 1), udp_ports=[53])
    assert "a scan probes at most %d" % LIMITS.net_max_ports in str(e.value)
