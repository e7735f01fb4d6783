"""Nova Fitness SDS011 particulate sensor: the sans-IO parser of its UART data frames.

In its default active mode the sensor sends one 10-byte frame per second at 9600 8N1:

=====  =====  ==================================================================
byte   value  meaning
=====  =====  ==================================================================
0      0xAA   frame head
1      0xC0   command id: measurement (0xC5: reply to a command, ignored here)
2-3           PM2.5, little-endian, tenths of a microgram per cubic metre
4-5           PM10, little-endian, tenths of a microgram per cubic metre
6-7           sensor id
8             checksum: sum of bytes 2..7, modulo 256
9      0xAB   frame tail
=====  =====  ==================================================================

``Sds011Parser.feed(data)`` returns ``Reading`` and ``FrameError`` events. Bytes that
cannot start a frame are reported as one ``garbage`` error per run; a frame whose checksum
fails is a ``checksum`` error, and the parser re-synchronises on the next 0xAA. Every byte
fed is accounted for: in a reading, in an error's ``discarded`` count, or still buffered.
"""

from __future__ import annotations

from .readings import Event, FrameError, Reading

FRAME_BYTES = 10
HEAD = 0xAA
TAIL = 0xAB
CMD_DATA = 0xC0
CMD_REPLY = 0xC5
UNIT = "ug/m3"  # SenML unit for micrograms per cubic metre (RFC 8798 registry)


def checksum(frame: bytes | bytearray) -> int:
    return sum(frame[2:8]) & 0xFF


def encode_frame(pm25_tenths: int, pm10_tenths: int, sensor_id: int = 0xA1B2) -> bytes:
    """A measurement frame as the sensor sends it (used by simulators and tests)."""
    body = bytes(
        [
            HEAD,
            CMD_DATA,
            pm25_tenths & 0xFF,
            pm25_tenths >> 8,
            pm10_tenths & 0xFF,
            pm10_tenths >> 8,
            sensor_id & 0xFF,
            sensor_id >> 8,
        ]
    )
    return body + bytes([checksum(body), TAIL])


class Sds011Parser:
    """Fed bytes from the UART, returns readings named ``<prefix>/pm25`` and ``.../pm10``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._buf = bytearray()
        self.frames = 0  # valid measurement frames decoded

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        self._buf.extend(data)
        events: list[Event] = []
        garbage = 0
        buf = self._buf
        while buf:
            if buf[0] != HEAD:
                nxt = buf.find(HEAD)
                cut = len(buf) if nxt < 0 else nxt
                garbage += cut
                del buf[:cut]
                continue
            if len(buf) >= 2 and buf[1] not in (CMD_DATA, CMD_REPLY):
                garbage += 1
                del buf[:1]
                continue
            if len(buf) < FRAME_BYTES:
                break  # a frame may still be arriving
            if buf[9] != TAIL:
                garbage += 1
                del buf[:1]
                continue
            if checksum(buf) != buf[8]:
                if garbage:
                    events.append(FrameError("garbage", "bytes outside frames", garbage))
                    garbage = 0
                nxt = buf.find(HEAD, 1, FRAME_BYTES)
                cut = FRAME_BYTES if nxt < 0 else nxt
                events.append(
                    FrameError("checksum", "want %02x got %02x" % (checksum(buf), buf[8]), cut)
                )
                del buf[:cut]
                continue
            if buf[1] == CMD_DATA:
                self.frames += 1
                pm25 = (buf[2] | buf[3] << 8) / 10
                pm10 = (buf[4] | buf[5] << 8) / 10
                events.append(Reading(self.prefix + "/pm25", UNIT, pm25))
                events.append(Reading(self.prefix + "/pm10", UNIT, pm10))
            del buf[:FRAME_BYTES]
        if garbage:
            events.append(FrameError("garbage", "bytes outside frames", garbage))
        return events
