"""Modbus RTU master: CRC, request encoding, responses, exceptions, timeouts, noise."""

from __future__ import annotations

import math
import struct

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
        assert len(p._buf) < 5 + 2 * 5  # never more than the one frame it waits for
    p.check_timeout(100.0)
    assert not p.pending


# --- function 4 (input registers), value types and byte orders, blocks -------------------

TYPES_32 = ("u32", "s32", "f32")


def test_read_input_registers_request_and_known_frames() -> None:
    # slave 1, function 4, 2 registers from 0: the frame every Modbus tool shows
    assert modbus.read_request(1, modbus.FN_READ_INPUT, 0, 2) == bytes.fromhex("01040000000271cb")
    assert modbus.exception_response(1, 2, modbus.FN_READ_INPUT)[:3] == b"\x01\x84\x02"
    for bad in ((0, 4, 0, 1), (1, 6, 0, 1), (1, 4, 0, 126), (1, 4, 0xFFFF, 2)):
        try:
            modbus.read_request(*bad)
        except ValueError:
            continue
        raise AssertionError("accepted %r" % (bad,))


def test_each_type_and_order_from_known_bytes() -> None:
    # 230.0 as an IEEE-754 single is 0x43660000: bytes A=43 B=66 C=00 D=00
    assert modbus.encode_value("f32", "ABCD", 230.0) == [0x4366, 0x0000]
    assert modbus.encode_value("f32", "CDAB", 230.0) == [0x0000, 0x4366]
    assert modbus.encode_value("f32", "BADC", 230.0) == [0x6643, 0x0000]
    assert modbus.encode_value("f32", "DCBA", 230.0) == [0x0000, 0x6643]
    for order, regs in (("ABCD", [0x0102, 0x0304]), ("CDAB", [0x0304, 0x0102]),
                        ("BADC", [0x0201, 0x0403]), ("DCBA", [0x0403, 0x0201])):
        assert modbus.decode_value("u32", order, regs) == 0x01020304
        assert modbus.decode_value("s32", order, regs) == 0x01020304
    assert modbus.decode_value("s32", "CDAB", [0xFFFE, 0xFFFF]) == -2
    assert modbus.decode_value("u32", "CDAB", [0xFFFE, 0xFFFF]) == 0xFFFFFFFE
    assert modbus.decode_value("s16", "ABCD", [0x8000]) == -32768
    assert modbus.decode_value("u16", "ABCD", [0x8000]) == 32768
    # the meter's 230.1 V, not the single's 230.10000610351562
    assert modbus.decode_value("f32", "ABCD", modbus.encode_value("f32", "ABCD", 230.1)) == 230.1
    assert math.isnan(modbus.decode_value("f32", "ABCD", [0x7FC0, 0]))
    assert modbus.decode_value("f32", "DCBA", [0, 0x80FF]) == -math.inf


def _single(x: float) -> bytes:
    return struct.pack(">f", x)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_value_of_each_type_and_order_survives_encode_decode(data: st.DataObject) -> None:
    type_ = data.draw(st.sampled_from(sorted(modbus.TYPES)))
    order = data.draw(st.sampled_from(modbus.ORDERS)) if type_ in TYPES_32 else "ABCD"
    value: float
    if type_ == "f32":
        value = data.draw(st.floats(width=32, allow_nan=True, allow_infinity=True))
    else:
        bits = 16 * modbus.TYPES[type_]
        signed = type_[0] == "s"
        lo = -(1 << (bits - 1)) if signed else 0
        hi = (1 << (bits - 1 if signed else bits)) - 1
        value = data.draw(st.integers(lo, hi))
    regs = modbus.encode_value(type_, order, value)
    assert len(regs) == modbus.TYPES[type_] and all(0 <= r <= 0xFFFF for r in regs)
    back = modbus.decode_value(type_, order, regs)
    if type_ != "f32":
        assert back == value and isinstance(back, int)
    elif math.isnan(value):
        assert math.isnan(back)
    else:  # the same single, written as briefly as the single allows
        assert _single(back) == _single(value)
        assert len(repr(back)) <= len(repr(value))


def test_blocks_one_per_table_split_at_max_registers() -> None:
    regs = [
        Register("v", 0x00, "V", type="f32", table="input"),
        Register("a", 0x06, "A", type="f32", table="input"),
        Register("hz", 0x46, "Hz", type="f32", table="input"),
        Register("kwh", 0x48, "kWh", type="f32", table="input"),
        Register("id", 0x14, "1"),
    ]
    blocks = modbus.plan_blocks(regs, 125)
    assert [(b.function, b.start, b.count) for b in blocks] == [(3, 0x14, 1), (4, 0, 0x4A)]
    blocks = modbus.plan_blocks(regs, 40)  # an Eastron meter answers 40 values at most
    assert [(b.function, b.start, b.count, [r.name for r in b.registers]) for b in blocks] == [
        (3, 0x14, 1, ["id"]), (4, 0, 8, ["v", "a"]), (4, 0x46, 4, ["hz", "kwh"])]


METER = [
    Register("voltage", 0x00, "V", type="f32", table="input"),
    Register("power", 0x0C, "W", type="f32", order="CDAB", table="input"),
    Register("serial", 0x02, "1", type="u32", order="DCBA"),
    Register("temp", 0x04, "Cel", type="s16", scale=0.5),
]


def _image(table: str, start: int, count: int, values: dict[str, float]) -> list[int]:
    regs = [0] * count
    for r in METER:
        if r.table == table and start <= r.address < start + count:
            words = modbus.encode_value(r.type, r.order, values[r.name])
            regs[r.address - start : r.address - start + r.words] = words
    return regs


def test_input_and_holding_blocks_of_one_slave() -> None:
    p = ModbusPoller("m", 9, METER)
    assert p.requests == [modbus.read_request(9, 3, 2, 3), modbus.read_request(9, 4, 0, 14)]
    values = {"voltage": 229.7, "power": -1500.25, "serial": 0xDEADBEEF, "temp": -7}
    got: list[object] = []
    p.request(0.0, 0)
    # the input block's answer while the holding block is pending is not its answer
    wrong = modbus.read_response(9, 4, _image("input", 0, 14, values))
    [e] = p.feed(wrong, 0.1)
    assert isinstance(e, FrameError) and e.kind == "garbage" and e.discarded == len(wrong)
    got += p.feed(modbus.read_response(9, 3, _image("holding", 2, 3, values)), 0.2)
    assert not p.pending
    p.request(1.0, 1)
    [e] = p.feed(modbus.exception_response(9, 2, modbus.FN_READ_INPUT), 1.1)
    assert isinstance(e, FrameError) and e.kind == "exception" and "illegal data" in e.detail
    p.request(2.0, 1)
    got += p.feed(modbus.read_response(9, 4, _image("input", 0, 14, values)), 2.1)
    assert [(r.name, r.value) for r in got if isinstance(r, Reading)] == [
        ("m/serial", 0xDEADBEEF), ("m/temp", -3.5), ("m/voltage", 229.7), ("m/power", -1500.25)]


def test_timeout_allows_for_the_wire_at_the_ports_baud() -> None:
    p = ModbusPoller("m", 9, [Register("x", 0, "1")], timeout_s=0.5, char_s=11 / 2400)
    p.request(10.0)
    wire = (8 + 5 + 2) * 11 / 2400
    assert p.deadline == 10.0 + 0.5 + wire
    assert p.check_timeout(10.0 + 0.5 + wire * 0.9) == []
    [e] = p.check_timeout(10.0 + 0.5 + wire)
    assert isinstance(e, FrameError) and e.kind == "timeout"


@settings(max_examples=300, deadline=None)
@given(
    voltage=st.floats(width=32, allow_nan=False, allow_infinity=False),
    noise=st.binary(max_size=20).filter(lambda b: b"\x09" not in b),
    cuts=st.lists(st.integers(0, 60), max_size=5),
)
def test_float_input_block_after_noise_in_any_split(voltage: float, noise: bytes,
                                                    cuts: list[int]) -> None:
    p = ModbusPoller("m", 9, METER)
    p.request(0.0, 1)
    values = {"voltage": voltage, "power": 1.0, "serial": 0, "temp": 0}
    stream = noise + modbus.read_response(9, 4, _image("input", 0, 14, values))
    events: list[object] = []
    last = 0
    for c in [*sorted(min(c, len(stream)) for c in cuts), len(stream)]:
        events += p.feed(stream[last:c], 0.0)
        last = c
    readings = [e for e in events if isinstance(e, Reading)]
    assert [r.name for r in readings] == ["m/voltage", "m/power"]
    # the same single (the offset's + 0.0 makes -0.0 read as 0.0, which is equal)
    assert struct.unpack(">f", _single(readings[0].value)) == (voltage,)
    assert sum(e.discarded for e in events if isinstance(e, FrameError)) == len(noise)
