"""Modbus RTU, master side: read holding registers (function 3) and input registers
(function 4), the values real meters put in them, and one slave's poll.

Sans-IO: ``ModbusPoller.request(now, block)`` returns the bytes to write;
``feed(data, now)`` returns events for the bytes read back; ``check_timeout(now)``
reports a slave that did not answer within ``timeout_s`` (default
``limits.MODBUS_RESPONSE_TIMEOUT_S``) plus the time the request and the longest answer
take on the wire (``char_s`` per character: 255 bytes take 1.2 s at 2400 baud). Frames
(Modbus over Serial Line V1.02, §2.5.1): address, function, data, CRC-16/MODBUS (poly
0xA001 reflected, init 0xFFFF, sent low byte first). Several slaves share a port by
taking turns: ``serial_input`` holds one poller per slave and keeps one request
outstanding on the bus at a time (RTU is half-duplex).

A poller reads its registers in blocks (``plan_blocks``): one request per table in use
(holding, input), split further only where a block would pass ``max_registers``. A
response is ``addr fn n data[n] crc`` with n = 2 x registers requested; an exception
response is ``addr fn|0x80 code crc`` (reported as an ``exception`` error with the code).
RTU has no start byte, so the parser uses the request it is waiting for to find the answer:
bytes before the expected address, function and length, or arriving when no request is
pending, are garbage. A CRC failure ends the request (the next poll retries). Nothing here
raises on input.

Values (``Register.type``): ``u16``/``s16`` in one register; ``u32``/``s32``/``f32``
(IEEE-754 single) in two, with the byte order the device uses (``Register.order``): name
the value's bytes A (most significant) to D and write them in the order they come off the
wire. ``ABCD`` is big-endian (Eastron SDM meters, the spec's own register order), ``CDAB``
swaps the words (common on Schneider and many PLCs), ``BADC`` swaps the bytes within each
word, ``DCBA`` is little-endian. A float is returned as the shortest decimal that is the
same single (230.1, not 230.10000610351562); NaN and infinity are passed on for the caller
to count (``serial_input``: ``not_finite``, never signed).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import limits
from .readings import Event, FrameError, Reading

FN_READ_HOLDING = 0x03
FN_READ_INPUT = 0x04
EXCEPTION_BIT = 0x80
TABLES = {"holding": FN_READ_HOLDING, "input": FN_READ_INPUT}
TYPES = {"u16": 1, "s16": 1, "u32": 2, "s32": 2, "f32": 2}  # type -> registers
ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "slave device failure",
    5: "acknowledge",
    6: "slave device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (check value for b"123456789" is 0x4B37)."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc


def with_crc(body: bytes) -> bytes:
    crc = crc16(body)
    return body + bytes([crc & 0xFF, crc >> 8])


def silent_interval_s(baud: int) -> float:
    """The quiet time that ends an RTU frame (3.5 characters of 11 bits; spec §2.5.1.1:
    fixed at 1.75 ms above 19200 baud). The master waits this long before each request."""
    return 3.5 * 11 / baud if baud <= 19200 else 0.00175


def read_request(unit: int, function: int, start: int, count: int) -> bytes:
    """The RTU frame asking slave ``unit`` for ``count`` registers from ``start``."""
    if not 1 <= unit <= 247:
        raise ValueError("Modbus unit address must be 1..247, got %d" % unit)
    if function not in (FN_READ_HOLDING, FN_READ_INPUT):
        raise ValueError("only functions 3 and 4 are read, got %d" % function)
    if not 1 <= count <= limits.MODBUS_MAX_REGISTERS:
        raise ValueError("register count must be 1..%d" % limits.MODBUS_MAX_REGISTERS)
    if not 0 <= start <= 0xFFFF - count + 1:
        raise ValueError("register range %d+%d outside 0..65535" % (start, count))
    return with_crc(bytes([unit, function, start >> 8, start & 0xFF, 0, count]))


def read_holding_request(unit: int, start: int, count: int) -> bytes:
    return read_request(unit, FN_READ_HOLDING, start, count)


def read_response(unit: int, function: int, registers: list[int]) -> bytes:
    """A slave's answer (for simulators and tests)."""
    data = b"".join((r & 0xFFFF).to_bytes(2, "big") for r in registers)
    return with_crc(bytes([unit, function, len(data)]) + data)


def read_holding_response(unit: int, registers: list[int]) -> bytes:
    return read_response(unit, FN_READ_HOLDING, registers)


def exception_response(unit: int, code: int, function: int = FN_READ_HOLDING) -> bytes:
    return with_crc(bytes([unit, function | EXCEPTION_BIT, code]))


def _shortest_single(x: float) -> float:
    """The shortest decimal whose IEEE-754 single is the same as ``x``'s."""
    if x - x != 0:  # NaN, infinity
        return x
    bits = struct.pack(">f", x)
    for digits in range(1, 10):  # 9 significant digits always round-trip a single
        y = float("%.*g" % (digits, x))
        try:
            if struct.pack(">f", y) == bits:
                return y
        except OverflowError:  # rounded past the largest single
            continue
    return x


def decode_value(type_: str, order: str, regs: list[int]) -> float:
    """The value of ``regs`` (as read off the wire) for a register of ``type_``/``order``."""
    if TYPES[type_] == 1:
        raw = regs[0]
        return raw - 0x10000 if type_ == "s16" and raw & 0x8000 else raw
    wire = regs[0].to_bytes(2, "big") + regs[1].to_bytes(2, "big")
    value = bytes(wire[order.index(ch)] for ch in "ABCD")
    if type_ == "f32":
        return _shortest_single(struct.unpack(">f", value)[0])
    return int.from_bytes(value, "big", signed=type_ == "s32")


def encode_value(type_: str, order: str, value: float) -> list[int]:
    """The registers a device with ``type_``/``order`` sends for ``value`` (simulators)."""
    if TYPES[type_] == 1:
        return [int(value) & 0xFFFF]
    if type_ == "f32":
        be = struct.pack(">f", value)
    else:
        be = int(value).to_bytes(4, "big", signed=type_ == "s32")
    wire = bytes(be["ABCD".index(ch)] for ch in order)
    return [wire[0] << 8 | wire[1], wire[2] << 8 | wire[3]]


@dataclass(frozen=True)
class Register:
    """One value to read: a ``type`` at ``address`` of ``table``, bytes in ``order``;
    the reading is ``value * scale + offset`` in SenML ``unit``."""

    name: str
    address: int
    unit: str
    type: str = "u16"
    order: str = "ABCD"
    table: str = "holding"
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.type not in TYPES or self.order not in ORDERS or self.table not in TABLES:
            raise ValueError("register %r: bad type, order or table" % self.name)

    @property
    def words(self) -> int:
        return TYPES[self.type]

    def decode(self, regs: list[int]) -> float:
        return decode_value(self.type, self.order, regs) * self.scale + self.offset


@dataclass(frozen=True)
class Block:
    """One read request: ``count`` registers from ``start`` with ``function``."""

    function: int
    start: int
    count: int
    registers: tuple[Register, ...]


def plan_blocks(registers: list[Register], max_registers: int) -> list[Block]:
    """Group registers into as few requests as possible: one per table, split where a
    block would span more than ``max_registers`` (some meters refuse long reads)."""
    blocks: list[Block] = []
    for table, function in TABLES.items():
        regs = sorted((r for r in registers if r.table == table), key=lambda r: r.address)
        group: list[Register] = []
        start = end = 0
        for r in regs:
            if group and max(end, r.address + r.words) - start > max_registers:
                blocks.append(Block(function, start, end - start, tuple(group)))
                group = []
            if not group:
                start, end = r.address, r.address
            group.append(r)
            end = max(end, r.address + r.words)
        if group:
            blocks.append(Block(function, start, end - start, tuple(group)))
    return blocks


class ModbusPoller:
    """Polls one slave for a fixed set of registers: one request per block, one at a time."""

    def __init__(
        self,
        prefix: str,
        unit: int,
        registers: list[Register],
        timeout_s: float = limits.MODBUS_RESPONSE_TIMEOUT_S,
        max_registers: int = limits.MODBUS_MAX_REGISTERS,
        char_s: float = 0.0,
    ) -> None:
        if not registers:
            raise ValueError("a Modbus poller needs at least one register")
        self.prefix = prefix
        self.unit = unit
        self.registers = registers
        self.blocks = plan_blocks(registers, max_registers)
        self.requests = [read_request(unit, b.function, b.start, b.count) for b in self.blocks]
        self.timeout_s = timeout_s
        self.char_s = char_s  # seconds per character on the wire (11 bits / baud)
        self._deadline = 0.0
        self._buf = bytearray()
        self._block = self.blocks[0]
        self._sent_at: float | None = None
        self.responses = 0

    @property
    def pending(self) -> bool:
        return self._sent_at is not None

    @property
    def deadline(self) -> float:
        """When the pending request times out (monotonic seconds)."""
        return self._deadline

    def request(self, now: float, block: int = 0) -> bytes:
        """Bytes to write to ask for ``blocks[block]``; forgets an unanswered request."""
        self._block = self.blocks[block]
        self._sent_at = now
        wire = 8 + 5 + 2 * self._block.count  # request + longest answer, in characters
        self._deadline = now + self.timeout_s + wire * self.char_s
        self._buf.clear()
        return self.requests[block]

    def check_timeout(self, now: float) -> list[Event]:
        if self._sent_at is None or now < self._deadline:
            return []
        self._sent_at = None
        n = len(self._buf)
        self._buf.clear()
        return [FrameError("timeout", "unit %d did not answer" % self.unit, n)]

    def feed(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        if self._sent_at is None:
            if data:
                events.append(FrameError("unexpected", "bytes with no request pending", len(data)))
            return events
        blk = self._block
        fn = blk.function
        buf = self._buf
        buf.extend(data)
        garbage = 0
        while buf and self._sent_at is not None:
            if buf[0] != self.unit or (len(buf) >= 2 and buf[1] not in (fn, fn | EXCEPTION_BIT)):
                garbage += 1
                del buf[:1]
                continue
            if len(buf) < 3:
                break
            if buf[1] == fn:
                if buf[2] != 2 * blk.count:
                    garbage += 1
                    del buf[:1]
                    continue
                size = 5 + buf[2]
            else:
                size = 5
            if len(buf) < size:
                break
            frame = bytes(buf[:size])
            del buf[:size]
            self._sent_at = None
            if crc16(frame[:-2]) != frame[-2] | frame[-1] << 8:
                events.append(FrameError("checksum", "CRC mismatch from unit %d" % self.unit, size))
            elif frame[1] != fn:
                code = frame[2]
                name = EXCEPTION_NAMES.get(code, "code %d" % code)
                events.append(FrameError("exception", "unit %d: %s" % (self.unit, name), size))
            else:
                self.responses += 1
                regs = [frame[3 + 2 * i] << 8 | frame[4 + 2 * i] for i in range(blk.count)]
                for r in blk.registers:
                    i = r.address - blk.start
                    value = r.decode(regs[i : i + r.words])
                    events.append(Reading(self.prefix + "/" + r.name, r.unit, value))
        if self._sent_at is None and buf:
            garbage += len(buf)
            buf.clear()
        if garbage:
            events.insert(0, FrameError("garbage", "bytes outside the response", garbage))
        return events
