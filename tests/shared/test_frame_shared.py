"""Provisioning frame codec tests that run on CPython (pytest) and MicroPython (tests/mp/run.py)."""

from cityedge_core import frame


def _msgs(items):
    return [x for x in items if not isinstance(x, frame.FrameError)]


def _codes(items):
    return [x.code for x in items if isinstance(x, frame.FrameError)]


def test_known_frame_bytes():
    # {0: 1} is a1 00 01; CRC-32 over 00 03 a1 00 01
    f = frame.encode_frame({0: frame.T_HELLO})
    assert f[:4] == b"\xce\x7e\x00\x03" and f[4:7] == b"\xa1\x00\x01"
    assert int.from_bytes(f[7:], "big") == frame.crc32(b"\x00\x03\xa1\x00\x01")
    assert frame.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value


def test_roundtrip_split_at_every_byte():
    msg = {0: frame.T_INSTALL, 1: [b"\x30\x82" + bytes(40)], 3: {"host": "127.0.0.1", "port": 8883}}
    f = frame.encode_frame(msg)
    for cut in range(len(f) + 1):
        d = frame.FrameDecoder()
        got = d.feed(f[:cut]) + d.feed(f[cut:])
        assert got == [msg], (cut, got)
        assert d.pending() == 0


def test_garbage_before_between_and_after():
    a = frame.encode_frame({0: frame.T_HELLO})
    b = frame.encode_frame({0: frame.T_CSR})
    d = frame.FrameDecoder()
    got = d.feed(b"boot banner\r\n" + a + b"\x00\xce" + b + b"\xffjunk")
    assert _msgs(got) == [{0: frame.T_HELLO}, {0: frame.T_CSR}]
    assert _codes(got) == [frame.E_GARBAGE, frame.E_GARBAGE, frame.E_GARBAGE]
    assert d.pending() == 0
    assert d.garbage_bytes == 13 + 2 + 5


def test_corrupted_crc_is_reported_and_next_frame_found():
    a = bytearray(frame.encode_frame({0: frame.T_HELLO, 1: "abc"}))
    a[6] ^= 0x40
    b = frame.encode_frame({0: frame.T_LOCK})
    got = frame.FrameDecoder().feed(bytes(a) + b)
    assert _msgs(got) == [{0: frame.T_LOCK}]
    assert _codes(got)[0] == frame.E_CRC


def test_oversize_length_resyncs():
    d = frame.FrameDecoder(max_body=64)
    b = frame.encode_frame({0: frame.T_LOCK})
    got = d.feed(frame.MAGIC + b"\x01\x00" + b)
    assert _codes(got)[0] == frame.E_OVERSIZE
    assert _msgs(got) == [{0: frame.T_LOCK}]
    try:
        frame.encode_frame({0: 1, 1: bytes(100)}, max_body=64)
    except ValueError:
        pass
    else:
        raise AssertionError("oversize message encoded")


def test_good_crc_bad_body_is_malformed():
    for body in (b"\x01", b"\xa1\x01\x01", b"\xa1\x00\xf5", b"\xff", b"\xa1\x00\x01\x00"):
        n = len(body)
        head = bytes((n >> 8, n & 0xFF))
        f = frame.MAGIC + head + body + frame.crc32(head + body).to_bytes(4, "big")
        got = frame.FrameDecoder().feed(f)
        assert _codes(got) == [frame.E_MALFORMED], (body, got)


def test_truncated_frame_stays_pending_until_reset():
    f = frame.encode_frame({0: frame.T_HELLO, 1: "x" * 20})
    d = frame.FrameDecoder()
    assert d.feed(f[:-1]) == []
    assert d.pending() == len(f) - 1
    d.reset()
    assert d.pending() == 0
    assert _msgs(d.feed(f)) == [{0: frame.T_HELLO, 1: "x" * 20}]


def test_error_message_roundtrip():
    f = frame.encode_frame(frame.error_message(frame.E_ORDER, "csr before generate_key"))
    (msg,) = frame.FrameDecoder().feed(f)
    err = frame.as_error(msg)
    assert err.code == frame.E_ORDER and err.message == "csr before generate_key"
