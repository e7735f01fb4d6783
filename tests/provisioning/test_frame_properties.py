"""Properties of the provisioning frame codec (hypothesis): round trip in any chunking,
corruption always detected, resynchronisation after any noise, bounded buffering."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import frame

scalars = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=40),
                    st.binary(max_size=80), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.integers(0, 30), inner, max_size=5)),
    max_leaves=20)
messages = st.builds(lambda t, fields: {**fields, 0: t}, st.integers(0, 255),
                     st.dictionaries(st.integers(1, 20), values, max_size=6))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def feed_all(dec: frame.FrameDecoder, chunks: list[bytes]) -> list[Any]:
    got: list[Any] = []
    for c in chunks:
        got.extend(dec.feed(c))
        assert dec.pending() <= dec.max_body + 8
    return got


@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=8))
def test_roundtrip_any_chunking(msgs: list[dict[int, Any]], cuts: list[int]) -> None:
    wire = b"".join(frame.encode_frame(m) for m in msgs)
    dec = frame.FrameDecoder()
    assert feed_all(dec, chunked(wire, cuts)) == msgs
    assert dec.pending() == 0


@given(messages, st.data())
def test_any_corruption_is_detected_and_the_next_frame_survives(
        msg: dict[int, Any], data: st.DataObject) -> None:
    f = bytearray(frame.encode_frame(msg))
    n_flips = data.draw(st.integers(1, 3))
    for _ in range(n_flips):
        i = data.draw(st.integers(0, len(f) - 1))
        f[i] ^= data.draw(st.integers(1, 255))
    follower = {0: frame.T_LOCK}
    tail = frame.encode_frame(follower)
    # zero padding satisfies any length a corrupted header may claim
    got = frame.FrameDecoder().feed(bytes(f) + bytes(frame.FRAME_MAX_BODY_BYTES + 8) + tail)
    good = [x for x in got if not isinstance(x, frame.FrameError)]
    if bytes(f) == frame.encode_frame(msg):  # the flips cancelled out
        assert good == [msg, follower]
    else:  # nothing decoded from the corrupted frame; the next frame is found
        assert good == [follower]


@given(st.binary(max_size=3000), messages, st.lists(st.integers(0, 4000), max_size=6))
def test_resync_after_any_noise(noise: bytes, msg: dict[int, Any], cuts: list[int]) -> None:
    wire = noise + bytes(frame.FRAME_MAX_BODY_BYTES + 8) + frame.encode_frame(msg)
    got = feed_all(frame.FrameDecoder(), chunked(wire, cuts))
    good = [x for x in got if not isinstance(x, frame.FrameError)]
    assert good[-1] == msg


@settings(max_examples=200)
@given(st.binary(max_size=20_000), st.lists(st.integers(0, 20_000), max_size=10))
def test_noise_never_crashes_and_buffer_stays_bounded(noise: bytes, cuts: list[int]) -> None:
    dec = frame.FrameDecoder(max_body=512)
    for item in feed_all(dec, chunked(noise, cuts)):
        assert isinstance(item, (dict, frame.FrameError))


@given(st.binary(min_size=1, max_size=200))
def test_any_body_with_good_crc_decodes_or_is_malformed(body: bytes) -> None:
    n = len(body).to_bytes(2, "big")
    f = frame.MAGIC + n + body + frame.crc32(n + body).to_bytes(4, "big")
    (item,) = [x for x in frame.FrameDecoder().feed(f) if not (
        isinstance(x, frame.FrameError) and x.code == frame.E_GARBAGE)]
    if isinstance(item, frame.FrameError):
        assert item.code == frame.E_MALFORMED
    else:
        assert isinstance(item, dict) and isinstance(item[0], int)
