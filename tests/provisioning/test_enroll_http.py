"""The device's enrollment HTTP client (``cityedge_fw.enroll_http``) as pure functions on
CPython: reply parsing never fails except with ``HttpError``, the URL rules, the retry
classification and the bounded backoff. The real client over sockets and TLS is run on the
MicroPython unix port in ``test_offline_ticket``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_fw import enroll_http as eh
from cityedge_fw.backoff import delay_ms

TICKET = {"serial": "SN-1", "token": "t", "csr_pem": "-----BEGIN...", "url": "https://f/x",
          "ca": b"der", "register": {"id": "urn:dev:mac:0024befffe800001"}}


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_http_error(raw: bytes) -> None:
    try:
        status, body = eh.parse_response(raw)
    except eh.HttpError:
        return
    assert 100 <= status <= 999 and isinstance(body, bytes)


@given(st.integers(100, 599), st.binary(max_size=2000),
       st.lists(st.tuples(st.sampled_from(["X-A", "Server", "Date"]),
                          st.text("abc xyz0123", max_size=20)), max_size=4))
def test_reply_round_trips(status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    head = "HTTP/1.1 %d Whatever\r\n" % status + "".join(
        "%s: %s\r\n" % h for h in headers) + "Content-Length: %d\r\n\r\n" % len(body)
    assert eh.parse_response(memoryview(head.encode() + body)) == (status, body)
    if body:
        with pytest.raises(eh.HttpError, match="cut short"):
            eh.parse_response(head.encode() + body[:-1])


@pytest.mark.parametrize("code", [b"+12", b"-12", b"012", b"2x0", b"\xd9\xa0\xd9"])
def test_status_codes_are_three_digits(code: bytes) -> None:
    with pytest.raises(eh.HttpError, match="status line"):
        eh.parse_response(b"HTTP/1.1 " + code + b" X\r\n\r\n")


def test_chunked_and_garbage_are_refused() -> None:
    with pytest.raises(eh.HttpError, match="transfer encoding"):
        eh.parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello")
    with pytest.raises(eh.HttpError, match="status line"):
        eh.parse_response(b"SSH-2.0-OpenSSH\r\n\r\n")


@given(st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True), st.integers(1, 65535),
       st.from_regex(r"(/[a-z0-9]{0,10}){0,3}", fullmatch=True))
def test_urls(host: str, port: int, path: str) -> None:
    assert eh.parse_url("https://%s:%d%s" % (host, port, path)) == (
        True, host, port, path or "/")
    assert eh.parse_url("http://%s%s" % (host, path), dev_http=True) == (
        False, host, 80, path or "/")
    with pytest.raises(ValueError, match="plain http is refused"):
        eh.parse_url("http://%s%s" % (host, path))


def fake_post(status: int, body: bytes | Exception) -> Any:
    def post(url: str, obj: dict[str, Any], ca: bytes | None, dev_http: bool
             ) -> tuple[int, bytes]:
        assert obj["registration"] == TICKET["register"] and ca == b"der" and not dev_http
        if isinstance(body, Exception):
            raise body
        return status, body

    return post


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (200, json.dumps({"chain_pem": "x"}).encode(), eh.OK),
    (200, b"<html>captive portal</html>", eh.RETRY),
    (200, b"[1, 2]", eh.RETRY),
    (503, b"", eh.RETRY),
    (429, b'{"detail": "slow down"}', eh.RETRY),
    (302, b"", eh.RETRY),
    (403, b'{"detail": "the enrollment token has expired"}', eh.REFUSED),
    (409, b"", eh.REFUSED),
    (0, OSError(111, "ECONNREFUSED"), eh.RETRY),
    (0, eh.TlsError("not signed by the trusted CA"), eh.RETRY),
])
def test_attempt_outcomes(status: int, body: bytes | Exception, outcome: str) -> None:
    got, value = eh.Enroller(TICKET, fake_post(status, body)).attempt()
    assert got == outcome, value
    if outcome == eh.REFUSED and status == 403:
        assert value == "HTTP 403: the enrollment token has expired"


def test_backoff_doubles_with_jitter_and_is_bounded() -> None:
    for attempt in range(40):
        top = min(eh.BACKOFF_FIRST_S * 1000 << attempt, eh.BACKOFF_MAX_S * 1000)
        for _ in range(20):
            assert top // 2 <= delay_ms(attempt, eh.BACKOFF_FIRST_S * 1000,
                                        eh.BACKOFF_MAX_S * 1000) <= top
    e = eh.Enroller(TICKET, fake_post(0, OSError(101, "ENETUNREACH")))
    waits = []
    for _ in range(12):
        e.attempt()
        waits.append(e.due_ms())
    assert waits[0] <= eh.BACKOFF_FIRST_S * 1000 and max(waits) <= eh.BACKOFF_MAX_S * 1000
    assert e.attempts == 12


def test_pem_bundle_to_der() -> None:
    import base64

    ders = [b"\x30\x03abc", bytes(range(200))]
    text = "".join("-----BEGIN CERTIFICATE-----\n%s\n-----END CERTIFICATE-----\n"
                   % base64.encodebytes(d).decode() for d in ders)
    assert eh.pem_to_der_list(text) == ders
    with pytest.raises(ValueError):
        eh.pem_to_der_list("no certificate here")
