"""Modbus RTU master: CRC, request encoding, responses, exceptions, timeouts, noise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_gateway import modbus
from cityedge_gateway.modbus import ModbusPoller, Register
from cityedge_gateway.readings import FrameError, Reading

REGS = [
    Register("temp", 0, "Cel", type="s16", scale=0.1),
    Register("rh", 1, "%RH", scale=0.1),
    Register("count", 3, "1", type="u32"),
]


def test_crc_check_value_and_known_request() -> None:
    assert modbus.crc16(b"123456789") == 0x4B37
    # The common example from the spec's documentation: slave 1, read 2 regs from 0.
    assert modbus.read_holding_request(1, 0, 2) == bytes.fromhex("010300000002c40b")


def test_response_decodes_registers() -> None:
    p = ModbusPoller("env", 7, REGS)
    assert [(b.function, b.start, b.count) for b in p.blocks] == [(3, 0, 5)]
    assert p.request(0.0) == modbus.read_holding_request(7, 0, 5)
    resp = modbus.read_holding_response(7, [(-52) & 0xFFFF, 613, 0, 1, 2])
    events = p.feed(resp, 0.1)
    assert [(e.name, round(e.value, 6)) for e in events if isinstance(e, Reading)] == [
        ("env/temp", -5.2),
        ("env/rh", 61.3),
        ("env/count", 65538),
    ]
    assert not p.pending


def test_exception_crc_timeout_and_unexpected_bytes() -> None:
    p = ModbusPoller("env", 7, REGS)
    p.request(0.0)
    [e] = p.feed(modbus.exception_response(7, 2), 0.1)
    assert (
        isinstance(e, FrameError) and e.kind == "exception" and "illegal data address" in e.detail
    )
    p.request(1.0)
    bad = bytearray(modbus.read_holding_response(7, [1, 2, 3, 4, 5]))
    bad[4] ^= 1
    [e] = p.feed(bytes(bad), 1.1)
    assert isinstance(e, FrameError) and e.kind == "checksum"
    [e] = p.feed(b"\x01\x02", 1.2)
    assert isinstance(e, FrameError) and e.kind == "unexpected"
    p.request(2.0)
    assert p.feed(b"\x07\x03", 2.1) == []
    assert p.check_timeout(2.5) == []
    [e] = p.check_timeout(3.1)
    assert isinstance(e, FrameError) and e.kind == "timeout" and e.discarded == 2


@settings(max_examples=300, deadline=None)
@given(
    regs=st.lists(st.integers(0, 0xFFFF), min_size=5, max_size=5),
    noise=st.binary(max_size=20).filter(lambda b: b"\x07" not in b),
    cuts=st.lists(st.integers(0, 40), max_size=5),
)
def test_response_after_noise_in_any_split(regs: list[int], noise: bytes, cuts: list[int]) -> None:
    p = ModbusPoller("env", 7, REGS)
    p.request(0.0)
    stream = noise + modbus.read_holding_response(7, regs)
    events: list[object] = []
    last = 0
    for c in [*sorted(min(c, len(stream)) for c in cuts), len(stream)]:
        events += p.feed(stream[last:c], 0.0)
        last = c
    readings = [e for e in events if isinstance(e, Reading)]
    assert len(readings) == 3
    assert readings[2].value == regs[3] << 16 | regs[4]
    assert sum(e.discarded for e in events if isinstance(e, FrameError)) == len(noise)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=8), st.booleans())
def test_arbitrary_bytes_never_crash(chunks: list[bytes], pending: bool) -> None:
    p = ModbusPoller("env", 7, REGS)
    if pending:
        p.request(0.0)
    for c in chunks:
        for e in p.feed(c, 0.0):
            assert isinstance(e, Reading | FrameError)
    p.check_timeout(100.0)
    assert not p.pending
