"""End to end: the real agent on the MicroPython unix port, mTLS to a real Mosquitto.

An independent subscriber (paho, as the fleet's ingest service) receives the batches; they
verify with the core's ``BatchVerifier`` and one with ``pycose``, and the chain is unbroken.
Also: broker killed and restarted mid-stream (nothing lost, in order), and a device with a
foreign certificate or another device's id gets nothing through.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fw_harness import (
    DEVICE,
    Subscriber,
    check_chain,
    device_config,
    finish,
    start_device,
    wait_for,
)
from pycose.keys.curves import P256
from pycose.keys.ec2 import EC2Key
from pycose.messages import Sign1Message

from cityedge_core.batch import Batch
from cityedge_core.cose import decode_sign1
from cityedge_host.crypto import EcVerifier

from support.mosquitto import Credentials, Mosquitto, TestPKI

OTHER = "urn:dev:mac:0024befffe804ff2"


def pycose_verify(data: bytes, creds: Credentials) -> bytes:
    nums = creds.key.public_key().public_numbers()
    key = EC2Key(crv=P256, x=nums.x.to_bytes(32, "big"), y=nums.y.to_bytes(32, "big"))
    msg = Sign1Message.decode(data)
    msg.key = key
    assert msg.verify_signature()
    payload: bytes = msg.payload
    return payload


@pytest.fixture
def broker(pki: TestPKI) -> Iterator[Mosquitto]:
    b = Mosquitto(pki, persistence=True, extra="autosave_interval 1", clients=[DEVICE]).start()
    yield b
    b.cleanup()


def test_agent_streams_signed_batches_over_mtls(broker: Mosquitto, pki: TestPKI,
                                                 mpy_dir: Path, tmp_path: Path) -> None:
    creds = pki.issue_client(DEVICE)
    sub = Subscriber(broker, pki)
    try:
        proc = start_device(mpy_dir, device_config(tmp_path, broker, pki, creds,
                                                   {"batches": 6}))
        result = finish(proc)
        assert result["batches"] >= 6 and result["stored"] == 0, result
        assert result["connects"] == 1 and result["last_error"] == "", result
        wait_for(lambda: len(sub.readings()) >= result["seq"])
        seqs = check_chain(sub.readings(), creds)
        assert seqs == list(range(1, result["seq"] + 1))
        payload = pycose_verify(sub.readings()[0], creds)
        batch = Batch.decode(payload)
        assert batch.device == DEVICE and batch.seq == 1 and batch.timebase == 1
        assert len(batch.records) == 10 and batch.records[0][0] == "s1_t"
        # the status message is signed with the same key
        wait_for(lambda: len(sub.status()) >= 1)
        msg = decode_sign1(sub.status()[0])
        msg.verify(EcVerifier(creds.key.public_key()))
        assert result["fed"] > 0  # the watchdog was fed while healthy
    finally:
        sub.close()


def test_broker_outage_loses_nothing(broker: Mosquitto, pki: TestPKI, mpy_dir: Path,
                                     tmp_path: Path) -> None:
    creds = pki.issue_client(DEVICE)
    sub = Subscriber(broker, pki)
    time.sleep(1.5)  # let the broker autosave the subscriber's session before we kill it
    try:
        proc = start_device(mpy_dir, device_config(tmp_path, broker, pki, creds,
                                                   {"batches": 16}))
        wait_for(lambda: len(sub.readings()) >= 3)
        broker.kill()
        time.sleep(3)  # the device keeps sampling and signing into its buffer
        broker.start()
        result = finish(proc)
        assert result["connects"] >= 2, result
        assert result["stored"] == 0 and result["drops"] == 0, result
        wait_for(lambda: len({m for m in sub.readings()}) >= result["seq"], timeout=30)
        seqs = check_chain(sub.readings(), creds)
        assert seqs == list(range(1, result["seq"] + 1)), seqs
    finally:
        sub.close()


def test_foreign_certificate_and_foreign_id_get_nothing_through(
        broker: Mosquitto, pki: TestPKI, mpy_dir: Path, tmp_path: Path) -> None:
    sub = Subscriber(broker, pki)
    try:
        rogue = TestPKI(tmp_path / "rogue", ca_name="rogue CA").issue_client(DEVICE)
        (tmp_path / "a").mkdir()
        proc = start_device(mpy_dir, device_config(tmp_path / "a", broker, pki, rogue,
                                                   {"seconds": 3}))
        result = finish(proc)
        assert result["connects"] == 0 and result["published"] == 0, result
        assert result["stored"] == result["batches"] > 0, result  # kept for later, not lost
        assert "mqtt" in result["link_error"], result
        # a genuine device certificate, but the agent claims another device's id
        creds = pki.issue_client(DEVICE)
        (tmp_path / "b").mkdir()
        proc = start_device(mpy_dir, device_config(tmp_path / "b", broker, pki, creds,
                                                   {"batches": 3}, device=OTHER))
        result = finish(proc)
        assert result["connects"] == 1 and result["published"] >= 3, result
        time.sleep(0.5)
        assert sub.readings(OTHER) == [] and sub.readings(DEVICE) == []
        assert sub.status(OTHER) == []
    finally:
        sub.close()
