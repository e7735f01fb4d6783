"""Buffer full (agent + real ring buffer, on CPython): the oldest batches are dropped, each
drop is reported by a signed drop record, and the counts are exact, across a reboot too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cityedge_core import batch as batchmod
from cityedge_fw import agent as agentmod
from cityedge_fw import drops, mqtt, store

from support.firmware_agent import DEVICE, KEY, KID, account, make_agent
from support.mqtt_codec import sent
from support.ring_reader import oldest, seqs


@pytest.mark.parametrize("budget", [4096, 6000])
def test_buffer_full_drops_oldest_and_reports_exact_counts(tmp_path: Path, budget: int) -> None:
    readings = 0
    a = make_agent(tmp_path, budget, batch_readings=4)
    for _ in range(40):
        readings += a.sweep()
    a.seal()
    a = make_agent(tmp_path, budget, batch_readings=4)  # reboot: chain, tally from flash
    assert a.boot == 2
    for _ in range(30):
        readings += a.sweep()
    a.seal()
    assert a.store.used_bytes <= budget
    assert a.store.count > 5  # no storm of drop records while the link is down
    assert a.report_drops()  # the link came up: one record for everything lost so far
    # (storing it may push one more batch out, which the next record reports)
    for _ in range(3):
        if not a.report_drops():
            break
    assert a.drops_total > 0 and a.state.get("drop") is None

    got = account(data for _seq, data in oldest(a.store, a.store.count))
    assert got["readings"] + got["lost_readings"] == readings
    assert got["batches"] + got["lost_batches"] == a.writer.seq
    assert got["missing"] == 0  # every gap explained by a record


def test_a_batch_that_fails_its_crc_is_reported_in_a_signed_drop_record(
        tmp_path: Path) -> None:
    """A stored batch whose file fails its CRC (a flash bit error) is dropped when the
    forwarder reads it, through the agent's one ledger: the next drop record covers its
    seq and its readings, and the fleet sees no unexplained gap."""
    a = make_agent(tmp_path, 1 << 16, batch_readings=4)
    readings = 0
    while a.writer.seq < 4:
        readings += a.sweep()
    a.seal()
    path = tmp_path / "buf" / ("%012x.b" % 2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    sent = []
    after = 0
    while (got := a.store.next_after(after)) is not None:  # the forwarder's reads
        sent.append(bytes(got[1]))
        after = got[0]
    assert not path.exists()
    assert a.state.get("drop") == [2, 2, 1, 4]  # the seq and its readings (header's count)
    assert a.report_drops()
    sent.extend(data for seq, data in oldest(a.store, a.store.count) if seq > after)
    fleet = account(sent)
    assert fleet["records"] == 1 and fleet["lost_batches"] == 1 and fleet["missing"] == 0
    assert fleet["batches"] + fleet["lost_batches"] == a.writer.seq
    assert fleet["readings"] + fleet["lost_readings"] == readings


def test_drop_tally_of_a_drop_record_passes_its_counts_on() -> None:
    w = batchmod.BatchWriter(DEVICE, KEY, KID, seq=9)
    rec = w.sign([], 1, batchmod.TIME_SINCE_BOOT, batchmod.KIND_DROP, [2, 8, 7, 25])
    assert drops.tally(10, rec) == [2, 10, 8, 25]
    data = w.sign([{0: "t", 2: 1}], 1, batchmod.TIME_SINCE_BOOT)
    assert drops.tally(11, data) == [11, 11, 1, 1]
    assert drops.merge([2, 10, 8, 25], [11, 11, 1, 1]) == [2, 11, 9, 26]
    assert drops.tally(12, b"garbage") == [12, 12, 1, 0]


def test_cost_counts_from_headers_and_decodes_only_what_has_none(tmp_path: Path) -> None:
    """The ledger reads a reading batch's count from its header (meta) and decodes only
    a batch without one; both give the counts a full decode gives."""
    w = batchmod.BatchWriter(DEVICE, KEY, KID)
    with_meta = store.RingBuffer(str(tmp_path / "a"), 1 << 20)
    without = store.RingBuffer(str(tmp_path / "b"), 1 << 20)
    for n in (3, 0, 5, 1):
        records = [{0: "t", 2: float(i)} for i in range(n)]
        data = w.sign(records, 1, batchmod.TIME_SINCE_BOOT)
        with_meta.append(w.seq, data, n + 1)
        without.append(w.seq, data)
    rec = w.sign([], 1, batchmod.TIME_SINCE_BOOT, batchmod.KIND_DROP, [1, 1, 1, 4])
    with_meta.append(w.seq, rec)  # a drop record: no meta, decoded
    without.append(w.seq, rec)
    for held in ([1], [1, 2, 3], [1, 2, 3, 4, 5]):
        assert drops.cost(with_meta, held) == drops.cost(without, held)
    assert drops.cost(with_meta, [1, 2, 3, 4, 5]) == [1, 5, 6, 4 + 9]  # incl. the record's
    assert drops.cost(with_meta, [1]) == [1, 1, 1, 3]


class Broker:
    """The broker as far as the agent's forwarder goes: takes what the MQTT client queued
    (copied at once: the agent reuses its buffer), keeps every batch it received, and
    acknowledges them only when told to."""

    def __init__(self, a: agentmod.Agent) -> None:
        self.a = a
        self.received: list[bytes] = []
        self.unacked: list[int] = []
        a.link.sending = self._drain  # type: ignore[method-assign]

    def connect(self) -> None:
        c = self.a.link.client
        c.connect()
        sent(c)
        asyncio.run(self.feed(bytes([0x20, 2, 0, 0])))  # CONNACK

    async def feed(self, data: bytes) -> None:
        for event in self.a.link.client.feed(data):
            await self.a._on_event(event)

    def forward(self) -> None:
        asyncio.run(self.a.forward_once())
        self._drain()

    def _drain(self) -> bool:
        """The socket: what the client queued is written (the forwarder waits for this
        before it reads the next batch into the same buffer)."""
        raw = memoryview(b"".join(bytes(c) for c in self.a.link.client.chunks_to_send()))
        while len(raw):
            found = mqtt.split_packet(raw)
            assert found is not None
            ptype, flags, start, end = found
            if ptype == mqtt.PUBLISH:
                topic, payload, _qos, _retain, _dup, pid = mqtt.decode_publish(
                    flags, raw[start:end])
                if topic.endswith("/up/readings"):
                    self.received.append(bytes(payload))
                    self.unacked.append(pid)
            raw = raw[end:]
        return False

    def ack_all(self) -> None:
        while self.unacked:
            asyncio.run(self.feed(mqtt.encode_puback(self.unacked.pop(0))))


def test_a_batch_whose_puback_was_lost_in_a_reset_is_never_also_counted_lost(
        tmp_path: Path) -> None:
    """The buffer-full race, step by step: batches reach the broker, the connection is
    reset before their PUBACKs, the buffer overflows during the outage. The sent,
    unacknowledged batches are kept (the next oldest go instead) and sent again after
    the reconnect; the fleet reads every seq exactly once as arrived or lost."""
    a = make_agent(tmp_path, 4096, batch_readings=4)
    broker = Broker(a)
    readings = 0
    while a.writer.seq < 3:
        readings += a.sweep()
    broker.connect()
    broker.forward()  # batches 1 and 2 reach the broker (the window holds two) ...
    assert len(broker.received) == 2
    a.link.client.connection_lost()  # ... and ECONNRESET takes their PUBACKs
    broker.unacked = []
    while (a.state.get("drop") or [0, 0, 0])[2] < 10:  # type: ignore[index]
        # a long outage: the buffer overflows
        readings += a.sweep()
    assert seqs(a.store)[:2] == [1, 2]  # the batches the fleet may have are still here
    assert a.state.get("drop")[0] >= 3  # type: ignore[index]  # the tally starts past them
    a.seal()
    broker.connect()
    for _ in range(100):
        broker.forward()
        broker.ack_all()
        if not a.store.count and a.state.get("drop") is None:
            break
    assert a.store.count == 0
    fleet = account(broker.received)
    assert fleet["duplicates"] == 2  # batches 1 and 2, sent again after the reconnect
    assert fleet["batches"] + fleet["lost_batches"] == a.writer.seq, fleet
    assert fleet["readings"] + fleet["lost_readings"] == readings, fleet
    assert fleet["missing"] == 0 and fleet["records"] >= 1, fleet
