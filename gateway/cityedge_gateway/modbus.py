"""Modbus RTU, master side: read-holding-registers (function 3) requests and responses.

Sans-IO: ``ModbusPoller.request(now)`` returns the bytes to write; ``feed(data, now)``
returns events for the bytes read back; ``check_timeout(now)`` reports a slave that did
not answer within ``limits.MODBUS_RESPONSE_TIMEOUT_S``. Frames (Modbus over Serial Line
V1.02, §2.5.1): address, function, data, CRC-16/MODBUS (poly 0xA001 reflected, init
0xFFFF, sent low byte first).

A response is ``addr 03 n data[n] crc`` with n = 2 x registers requested; an exception
response is ``addr 83 code crc`` (reported as an ``exception`` error with the code). RTU
has no start byte, so the parser uses the request it is waiting for to find the answer:
bytes before the expected address, or arriving when no request is pending, are garbage.
A CRC failure ends the request (the next poll retries). Nothing here raises on input.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import limits
from .readings import Event, FrameError, Reading

FN_READ_HOLDING = 0x03
EXCEPTION_BIT = 0x80
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


def read_holding_request(unit: int, start: int, count: int) -> bytes:
    """The RTU frame asking slave ``unit`` for ``count`` registers from ``start``."""
    if not 1 <= unit <= 247:
        raise ValueError("Modbus unit address must be 1..247, got %d" % unit)
    if not 1 <= count <= limits.MODBUS_MAX_REGISTERS:
        raise ValueError("register count must be 1..%d" % limits.MODBUS_MAX_REGISTERS)
    if not 0 <= start <= 0xFFFF - count + 1:
        raise ValueError("register range %d+%d outside 0..65535" % (start, count))
    return with_crc(bytes([unit, FN_READ_HOLDING, start >> 8, start & 0xFF, 0, count]))


def read_holding_response(unit: int, registers: list[int]) -> bytes:
    """A slave's answer (for simulators and tests)."""
    data = b"".join((r & 0xFFFF).to_bytes(2, "big") for r in registers)
    return with_crc(bytes([unit, FN_READ_HOLDING, len(data)]) + data)


def exception_response(unit: int, code: int) -> bytes:
    return with_crc(bytes([unit, FN_READ_HOLDING | EXCEPTION_BIT, code]))


@dataclass(frozen=True)
class Register:
    """One value to read: ``words`` registers (1 or 2, big-endian word order) at ``address``;
    the reading is ``raw * scale + offset`` in SenML ``unit``."""

    name: str
    address: int
    unit: str
    words: int = 1
    signed: bool = False
    scale: float = 1.0
    offset: float = 0.0

    def decode(self, regs: list[int]) -> float:
        raw = 0
        for r in regs:
            raw = raw << 16 | r
        bits = 16 * self.words
        if self.signed and raw >= 1 << (bits - 1):
            raw -= 1 << bits
        return raw * self.scale + self.offset


class ModbusPoller:
    """Polls one slave for a fixed set of registers, one block request per poll."""

    def __init__(
        self,
        prefix: str,
        unit: int,
        registers: list[Register],
        timeout_s: float = limits.MODBUS_RESPONSE_TIMEOUT_S,
    ) -> None:
        if not registers:
            raise ValueError("a Modbus poller needs at least one register")
        self.prefix = prefix
        self.unit = unit
        self.registers = registers
        self.start = min(r.address for r in registers)
        self.count = max(r.address + r.words for r in registers) - self.start
        self.request_bytes = read_holding_request(unit, self.start, self.count)
        self.timeout_s = timeout_s
        self._buf = bytearray()
        self._sent_at: float | None = None
        self.responses = 0

    @property
    def pending(self) -> bool:
        return self._sent_at is not None

    def request(self, now: float) -> bytes:
        """Bytes to write for the next poll; an unanswered request before it times out."""
        self._sent_at = now
        self._buf.clear()
        return self.request_bytes

    def check_timeout(self, now: float) -> list[Event]:
        if self._sent_at is None or now - self._sent_at < self.timeout_s:
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
        buf = self._buf
        buf.extend(data)
        garbage = 0
        while buf and self._sent_at is not None:
            if buf[0] != self.unit or (
                len(buf) >= 2 and buf[1] not in (FN_READ_HOLDING, FN_READ_HOLDING | EXCEPTION_BIT)
            ):
                garbage += 1
                del buf[:1]
                continue
            if len(buf) < 3:
                break
            if buf[1] == FN_READ_HOLDING:
                if buf[2] != 2 * self.count:
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
            elif frame[1] != FN_READ_HOLDING:
                code = frame[2]
                name = EXCEPTION_NAMES.get(code, "code %d" % code)
                events.append(FrameError("exception", "unit %d: %s" % (self.unit, name), size))
            else:
                self.responses += 1
                regs = [frame[3 + 2 * i] << 8 | frame[4 + 2 * i] for i in range(self.count)]
                for r in self.registers:
                    i = r.address - self.start
                    value = r.decode(regs[i : i + r.words])
                    events.append(Reading(self.prefix + "/" + r.name, r.unit, value))
        if self._sent_at is None and buf:
            garbage += len(buf)
            buf.clear()
        if garbage:
            events.insert(0, FrameError("garbage", "bytes outside the response", garbage))
        return events
