"""SDS011 frame parser: valid frames, corruption, garbage, arbitrary splits (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_gateway import sds011
from cityedge_gateway.readings import FrameError, Reading


def _readings(events: list[object]) -> list[tuple[str, float]]:
    return [(e.name, e.value) for e in events if isinstance(e, Reading)]


def test_known_frame_decodes() -> None:
    # PM2.5 = 0x0019 = 2.5 ug/m3, PM10 = 0x0030 = 4.8 ug/m3
    frame = (
        bytes.fromhex("aac019003000b2a1") + bytes([(0x19 + 0x30 + 0xA1 + 0xB2) & 0xFF]) + b"\xab"
    )
    assert frame == sds011.encode_frame(25, 48)
    events = sds011.Sds011Parser("pm").feed(frame)
    assert _readings(events) == [("pm/pm25", 2.5), ("pm/pm10", 4.8)]
    assert all(isinstance(e, Reading) and e.unit == "ug/m3" for e in events)


def test_bad_checksum_is_reported_and_next_frame_still_decodes() -> None:
    bad = bytearray(sds011.encode_frame(100, 200))
    bad[8] ^= 0xFF
    p = sds011.Sds011Parser("pm")
    events = p.feed(bytes(bad) + sds011.encode_frame(7, 9))
    errors = [e for e in events if isinstance(e, FrameError)]
    assert [e.kind for e in errors] == ["checksum"]
    assert errors[0].discarded == 10
    assert _readings(events) == [("pm/pm25", 0.7), ("pm/pm10", 0.9)]


def test_command_reply_frames_are_ignored_not_errors() -> None:
    body = bytearray(sds011.encode_frame(1, 2))
    body[1] = sds011.CMD_REPLY
    assert sds011.Sds011Parser("pm").feed(bytes(body)) == []


frames_st = st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=8)
noise_st = st.binary(max_size=12).map(lambda b: b.replace(b"\xaa", b"\x00"))


@settings(max_examples=300, deadline=None)
@given(frames=frames_st, noise=st.lists(noise_st, min_size=9, max_size=9), data=st.data())
def test_frames_between_garbage_survive_any_split(
    frames: list[tuple[int, int]], noise: list[bytes], data: st.DataObject
) -> None:
    stream = bytearray()
    for i, (a, b) in enumerate(frames):
        stream += noise[i] + sds011.encode_frame(a, b)
    stream += noise[-1]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    p = sds011.Sds011Parser("s")
    events: list[object] = []
    last = 0
    for c in [*cuts, len(stream)]:
        events += p.feed(bytes(stream[last:c]))
        last = c
    want = []
    for a, b in frames:
        want += [("s/pm25", a / 10), ("s/pm10", b / 10)]
    assert _readings(events) == want
    discarded = sum(e.discarded for e in events if isinstance(e, FrameError))
    noise_bytes = sum(len(n) for n in noise[: len(frames)]) + len(noise[-1])
    assert discarded == noise_bytes - p.buffered


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=10))
def test_arbitrary_bytes_never_crash_and_are_accounted(chunks: list[bytes]) -> None:
    p = sds011.Sds011Parser("s")
    events: list[object] = []
    for c in chunks:
        events += p.feed(c)
    total = sum(len(c) for c in chunks)
    readings = len([e for e in events if isinstance(e, Reading)])
    discarded = sum(e.discarded for e in events if isinstance(e, FrameError))
    assert readings == 2 * p.frames
    assert p.buffered < sds011.FRAME_BYTES
    # ignored reply frames are the only bytes neither read nor discarded
    assert p.frames * 10 + discarded + p.buffered <= total
