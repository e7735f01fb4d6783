"""The sans-IO MQTT 3.1.1 client: codec round trips and the state machine (hypothesis),
and the same module on the MicroPython unix port."""

from __future__ import annotations

import contextlib
import gc
import weakref
from pathlib import Path

import pytest
from fw_harness import FIRMWARE, compile_firmware, run_micropython
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core.errors import LimitError, LocalError, MalformedError, PeerError, TransportError
from cityedge_fw import mqtt

from support.mqtt_codec import encode_publish, sent

topic_names = st.text(
    alphabet=st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)),
    min_size=1, max_size=40,
).filter(lambda t: len(t.encode()) <= mqtt._MAX_TOPIC_BYTES)
payloads = st.binary(max_size=300)


def connack(session_present: bool, code: int) -> bytes:
    """CONNACK as a broker sends it (§3.2)."""
    return bytes([0x20, 2, 1 if session_present else 0, code])


def suback(packet_id: int, granted: list[int]) -> bytes:
    return mqtt.packet(mqtt.SUBACK, 0, packet_id.to_bytes(2, "big") + bytes(granted))


def connected_client(**kw: object) -> mqtt.Client:
    c = mqtt.Client("urn:dev:mac:0011223344556677", **kw)  # type: ignore[arg-type]
    c.connect()
    sent(c)
    events = c.feed(connack(False, 0))
    assert events == [(mqtt.CONNACK, False)]
    return c


def split_all(data: bytes) -> list[tuple[int, int, bytes]]:
    """Cut a byte stream into (type, flags, body) packets; all bytes must be used."""
    out = []
    while data:
        found = mqtt.split_packet(data, 1 << 20)
        assert found is not None, "incomplete packet in %r" % data
        ptype, flags, start, end = found
        out.append((ptype, flags, data[start:end]))
        data = data[end:]
    return out


@given(st.integers(0, mqtt._REMAINING_LENGTH_MAX))
def test_remaining_length_round_trip(n: int) -> None:
    enc = mqtt.encode_length(n)
    assert 1 <= len(enc) <= 4
    hdr = b"\x30" + enc
    # the header alone parses to the announced length (no body yet -> None unless n == 0)
    found = mqtt.split_packet(hdr, mqtt._REMAINING_LENGTH_MAX + 5)
    if n == 0:
        assert found == (3, 0, len(hdr), len(hdr))
    else:
        assert found is None


@given(topic_names, payloads, st.sampled_from([0, 1]), st.booleans(), st.booleans(),
       st.integers(1, 0xFFFF))
def test_publish_round_trip(topic: str, payload: bytes, qos: int, retain: bool, dup: bool,
                            pid: int) -> None:
    data = encode_publish(topic, payload, qos, retain, pid if qos else 0, dup)
    [(ptype, flags, body)] = split_all(data)
    assert ptype == mqtt.PUBLISH
    got = mqtt.decode_publish(flags, body)
    assert got == (topic, payload, qos, retain, dup, pid if qos else 0)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:", min_size=1, max_size=100),
       st.integers(0, 0xFFFF), st.booleans(),
       st.none() | st.text(alphabet=st.characters(blacklist_characters="\x00",
                                                  blacklist_categories=("Cs",)),
                           min_size=1, max_size=50).filter(
                               lambda u: len(u.encode()) <= mqtt._MAX_CLIENT_ID_BYTES))
def test_connect_encoding(client_id: str, keepalive: int, clean: bool,
                          username: str | None) -> None:
    data = mqtt.encode_connect(client_id, keepalive, clean, username)
    [(ptype, flags, body)] = split_all(data)
    assert (ptype, flags) == (mqtt._CONNECT, 0)
    assert body[:7] == b"\x00\x04MQTT\x04"
    cflags = body[7]
    assert bool(cflags & 0x02) == clean
    assert bool(cflags & 0x80) == (username is not None)
    assert int.from_bytes(body[8:10], "big") == keepalive
    cid, pos = mqtt.decode_str(body, 10)
    assert cid == client_id
    if username is not None:
        assert mqtt.decode_str(body, pos) == (username, len(body))
    else:
        assert pos == len(body)


def test_connect_refuses_an_oversized_username() -> None:
    name = "\U0001d4d1" * (mqtt._MAX_CLIENT_ID_BYTES // 4 + 1)  # 4 UTF-8 bytes each
    with pytest.raises(ValueError, match="limit"):
        mqtt.encode_connect("dev", 60, True, name)


@given(st.lists(st.tuples(topic_names, st.sampled_from([0, 1])), min_size=1, max_size=5),
       st.integers(1, 0xFFFF))
def test_subscribe_encoding(filters: list[tuple[str, int]], pid: int) -> None:
    [(ptype, flags, body)] = split_all(mqtt.encode_subscribe(pid, filters))
    assert (ptype, flags) == (mqtt._SUBSCRIBE, 2)
    assert int.from_bytes(body[:2], "big") == pid
    pos, got = 2, []
    while pos < len(body):
        t, pos = mqtt.decode_str(body, pos)
        got.append((t, body[pos]))
        pos += 1
    assert got == filters


@given(st.lists(st.sampled_from(["pub0", "pub1", "ack_first", "ack_last", "ack_bogus",
                                 "reconnect"]), max_size=40), st.booleans())
def test_inflight_window_model(ops: list[str], keep: bool) -> None:
    """The in-flight window matches a model: FIFO of unacked QoS 1 ids, re-sent with DUP
    after each reconnect in the same order (or, with ``keep_inflight=False``, forgotten
    when the connection is lost), never larger than ``max_inflight``."""
    c = connected_client(max_inflight=3, keep_inflight=keep)
    model: list[tuple[int, bytes]] = []
    n = 0
    for op in ops:
        if op in ("pub0", "pub1"):
            qos = 1 if op == "pub1" else 0
            payload = b"m%d" % n
            n += 1
            if qos and len(model) == 3:
                with pytest.raises(LocalError, match="await PUBACK"):
                    c.publish("t/x", payload, qos)
                continue
            pid = c.publish("t/x", payload, qos)
            [(ptype, flags, body)] = split_all(sent(c))
            topic, got, q, _r, dup, gpid = mqtt.decode_publish(flags, body)
            assert (topic, got, q, dup, gpid) == ("t/x", payload, qos, False, pid)
            if qos:
                assert pid not in [p for p, _ in model]
                model.append((pid, payload))
        elif op in ("ack_first", "ack_last") and model:
            pid, _ = model.pop(0 if op == "ack_first" else -1)
            events = c.feed(mqtt.encode_puback(pid))
            assert events == [(mqtt.PUBACK, pid)]
        elif op == "ack_bogus":
            bogus = 1 + max([p for p, _ in model], default=0) + 1000
            assert c.feed(mqtt.encode_puback(bogus)) == []  # an answer to a DUP: ignored
        elif op == "reconnect":
            sessions = c.sessions
            c.connection_lost()
            if not keep:
                model = []  # the caller publishes them again from its own copy
            with pytest.raises(TransportError):
                c.publish("t/x", b"y", 1)
            c.connect()
            [(ptype, _, _)] = split_all(sent(c))
            assert ptype == mqtt._CONNECT
            c.feed(connack(True, 0))
            assert c.sessions == sessions + 1
            resent = split_all(sent(c))
            got = []
            for ptype, flags, body in resent:
                topic, payload, q, _r, dup, pid = mqtt.decode_publish(flags, body)
                assert (ptype, q, dup) == (mqtt.PUBLISH, 1, True)
                got.append((pid, payload))
            assert got == model
        assert len(c._inflight) == len(model) <= 3



class _Payload(bytearray):
    """A payload a weak reference can watch."""


@pytest.mark.parametrize("keep", [True, False])
def test_callers_payload_is_released_once_sent(keep: bool) -> None:
    """The client drops its reference to the caller's QoS 1 buffer once the chunk is
    taken for sending (the agent then reuses its read buffer); with ``keep_inflight``
    it keeps a copy of its own until the PUBACK, for the re-send after a reconnect."""
    c = connected_client(keep_inflight=keep)
    payload = _Payload(b"batch")
    watch = weakref.ref(payload)
    pid = c.publish("t/x", payload, 1)
    assert c.queued
    chunks = c.chunks_to_send()
    assert not c.queued and bytes(chunks[-1]) == b"batch"
    del chunks, payload
    gc.collect()
    assert watch() is None
    c.feed(mqtt.encode_puback(pid))
    assert len(c._inflight) == 0


@given(st.binary(min_size=1, max_size=300), st.booleans())
def test_resend_after_reconnect_carries_the_bytes_first_published(
        data: bytes, as_view: bool) -> None:
    """A kept payload (``keep_inflight=True``) is the client's own copy: the caller may
    read the next batch into the same buffer (as the agent does) and the re-send after
    a reconnect still carries the bytes first published."""
    buf = bytearray(data)
    c = connected_client(keep_inflight=True)
    payload = memoryview(buf) if as_view else buf
    c.publish("t/x", (b"", payload) if as_view else payload, 1)
    first = b"".join(bytes(x) for x in c.chunks_to_send())
    buf[:] = bytes(len(buf))  # the caller's buffer reused for the next batch
    buf[0] ^= 0xFF
    c.connection_lost()
    c.connect()
    sent(c)
    c.feed(connack(False, 0))
    again = b"".join(bytes(x) for x in c.chunks_to_send())
    assert again[1:] == first[1:] and again[0] == first[0] | 0x08  # same packet, DUP set


@given(st.lists(st.binary(max_size=300), max_size=5), st.sampled_from([0, 1]))
def test_payload_as_chunks_is_the_same_packet_as_joined(chunks: list[bytes], qos: int) -> None:
    """A tuple of chunks is queued one after the other, never joined, and the broker
    receives exactly the PUBLISH of the joined payload."""
    c = connected_client()
    pid = c.publish("t/x", tuple(chunks), qos)
    queued = c.chunks_to_send()
    assert queued[1:] == chunks
    assert b"".join(queued) == encode_publish("t/x", b"".join(chunks), qos, False, pid)


def _server_stream() -> tuple[bytes, list[tuple[object, ...]]]:
    parts: list[tuple[bytes, tuple[object, ...]]] = [
        (connack(True, 0), (mqtt.CONNACK, True)),
        (suback(1, [1, 0x80]), (mqtt.SUBACK, 1, b"\x01\x80")),
        (encode_publish("ce/v1/d/down/cmd", b"\x01" * 700, 1, False, 9),
         (mqtt.PUBLISH, "ce/v1/d/down/cmd", b"\x01" * 700, False)),
        (encode_publish("ce/v1/d/down/desired", b"", 0, True),
         (mqtt.PUBLISH, "ce/v1/d/down/desired", b"", True)),
        (b"\xd0\x00", (mqtt.PINGRESP,)),
    ]
    return b"".join(p for p, _ in parts), [e for _, e in parts]


@given(st.lists(st.integers(1, 800), max_size=20))
def test_feed_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    stream, expected = _server_stream()
    c = mqtt.Client("urn:dev:mac:0011223344556677")
    c.connect()
    sent(c)
    c._pending_subs.append(1)  # as if subscribe() had been called before CONNACK
    events = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        events += c.feed(stream[pos:pos + cut])
        pos += cut
        if pos >= len(stream):
            break
    assert events == expected
    # the QoS 1 message was acknowledged at once
    assert split_all(sent(c)) == [(mqtt.PUBACK, 0, (9).to_bytes(2, "big"))]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_from_the_broker_raises_only_peer_errors(data: bytes) -> None:
    c = connected_client(max_packet=100)
    with contextlib.suppress(PeerError):
        c.feed(data)


def test_oversized_packet_is_refused_before_buffering() -> None:
    c = connected_client(max_packet=1000)
    with pytest.raises(LimitError):
        c.feed(b"\x30" + mqtt.encode_length(5000))


def test_connack_refused_and_protocol_violations() -> None:
    c = mqtt.Client("urn:dev:mac:0011223344556677")
    c.connect()
    with pytest.raises(TransportError, match=r"not authorized \(code 5\)"):
        c.feed(connack(False, 5))
    assert c.state == mqtt.DISCONNECTED
    c.connect()
    with pytest.raises(TransportError, match=r"refused the connection: unknown \(code 9\)"):
        c.feed(connack(False, 9))
    assert c.state == mqtt.DISCONNECTED
    c.connect()
    with pytest.raises(MalformedError):
        c.feed(mqtt.encode_puback(1))  # anything but CONNACK first
    c = connected_client()
    with pytest.raises(MalformedError):
        c.feed(mqtt.packet(mqtt.PUBLISH, 4, mqtt.encode_str("a/b") + b"\x00\x01"))  # QoS 2


def test_keepalive_ping_and_timeout() -> None:
    c = mqtt.Client("urn:dev:mac:0011223344556677", keepalive_s=10)
    c.connect(now_ms=0)
    c.feed(connack(False, 0))
    sent(c)
    c.tick(4000)
    assert sent(c) == b""
    c.tick(5000)
    assert sent(c) == mqtt._PINGREQ_BYTES
    c.tick(14000)  # waiting for PINGRESP, not yet late
    assert sent(c) == b""
    assert c.feed(b"\xd0\x00") == [(mqtt.PINGRESP,)]
    c.tick(10000)
    assert sent(c) == mqtt._PINGREQ_BYTES
    with pytest.raises(TransportError):
        c.tick(20000)


def test_bad_arguments_are_value_errors() -> None:
    c = connected_client()
    for topic in ("", "a/+", "a/#", "a\x00b"):
        with pytest.raises(ValueError):
            c.publish(topic, b"x")
    with pytest.raises(ValueError):
        c.publish("a", b"x", qos=2)
    with pytest.raises(ValueError):
        mqtt.encode_length(mqtt._REMAINING_LENGTH_MAX + 1)


_MP_SCRIPT = """
from cityedge_fw import mqtt
def sent(c):
    return b"".join(c.chunks_to_send())
def encode_publish(topic, payload, qos, retain, pid):
    return mqtt.publish_header(topic, len(payload), qos, retain, pid) + payload
c = mqtt.Client("urn:dev:mac:0011223344556677", keepalive_s=30)
c.connect()
out = sent(c)
assert out[0] == 0x10, out
c.feed(b"\\x20\\x02\\x00\\x00")
pid = c.publish("ce/v1/x/up/readings", b"abc" * 100, 1)
c.connection_lost()
c.connect()
sent(c)
c.feed(b"\\x20\\x02\\x00\\x00")
resent = sent(c)
assert resent[0] == 0x3A, resent[:2]  # PUBLISH, DUP, QoS 1
ev = c.feed(mqtt.encode_puback(pid) + encode_publish("a/b", b"hi", 1, False, 3)[:5])
assert ev == [(mqtt.PUBACK, pid)] and len(c._inflight) == 0
ev = c.feed(encode_publish("a/b", b"hi", 1, False, 3)[5:])
assert ev == [(mqtt.PUBLISH, "a/b", b"hi", False)], ev
assert sent(c) == mqtt.encode_puback(3)
try:
    c.feed(b"\\x30\\xff\\xff\\xff\\xff\\x01")
except mqtt.MalformedError:
    print("malformed ok")
print("mqtt ok")
"""


@pytest.mark.parametrize("form", ["source", "mpy"])
def test_same_module_runs_on_micropython(micropython: str, mpy_cross: str, tmp_path: Path,
                                         form: str) -> None:
    # compiling source needs more heap than a board has; the .mpy form runs at 64 KiB
    if form == "source":
        result = run_micropython(_MP_SCRIPT, FIRMWARE, heap="512k")
    else:
        result = run_micropython(_MP_SCRIPT, compile_firmware(tmp_path), heap="64k")
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.split() == ["malformed", "ok", "mqtt", "ok"]
