"""Fleet commands end to end, and a reboot: the real agent on the MicroPython unix port at
the firmware tests' heap, a real Mosquitto, commands published as ``fleet-commands``.

- the retained, signed ``down/desired`` is applied (its batch size shows in the batches
  the fleet receives) and remembered across a reboot, where the same retained message is
  then refused as a replay;
- a signed ``status`` command on ``down/cmd`` makes the device publish its status;
- a command signed by a key the device does not trust changes nothing;
- the reboot reads the state file and goes on with the chain: boot 2, seq continues,
  every batch of both boots verifies in one unbroken chain. The decoders a command or
  the state file needs are loaded for that moment only.

Heap: the other agent tests' (``fw_harness.HEAP``). Checking a command loads the CBOR
decoder and the gate (about 4.1 KiB while it runs, in small blocks: their names were
interned at boot, ``main.build``) into a heap that streaming has fragmented; a command
that finds no room is checked again later, so the test allows retries (``mem_errors``)
and requires each command obeyed once.
"""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import paho.mqtt.client as paho
from fw_harness import (
    DEVICE,
    HEAP,
    Subscriber,
    check_chain,
    device_config,
    finish,
    start_device,
    wait_for,
)
from mp_fleet import fleet_publisher

from cityedge_core import cose
from cityedge_core.command import encode_command
from cityedge_host.crypto import EcSigner, public_sec1

from support.mosquitto import Mosquitto, TestPKI


def publish(c: paho.Client, leaf: str, payload: bytes, retain: bool = False) -> None:
    info = c.publish("ce/v1/%s/%s" % (DEVICE, leaf), payload, qos=1, retain=retain)
    info.wait_for_publish(10)
    assert info.is_published()


def record_counts(messages: list[bytes]) -> list[int]:
    return [len(cbor2.loads(cose.decode_sign1(m).payload)[7]) for m in messages]


def test_signed_commands_are_obeyed_forged_ones_refused_across_a_reboot(
        mosquitto: Mosquitto, pki: TestPKI, mpy_dir: Path, tmp_path: Path) -> None:
    broker = mosquitto
    creds = pki.issue_client(DEVICE)
    broker.grant(DEVICE)
    fleet = EcSigner.generate()
    rogue = EcSigner.generate()
    key_file = tmp_path / "fleet.pub"
    key_file.write_bytes(public_sec1(fleet.public_key))
    sub = Subscriber(broker, pki)
    pub = fleet_publisher(broker, pki)
    expires = int(time.time()) + 3600
    try:
        publish(pub, "down/desired", encode_command(
            fleet, fleet.kid, "desired", DEVICE, 1, expires, {"batch_readings": 4}), True)

        def config(stop: dict[str, object]) -> Path:
            return device_config(tmp_path, broker, pki, creds, stop, clock=True,
                                 fleet_keys=(str(key_file),), batch_readings=10, time_scale=5,
                                 status_interval_s=86400)

        proc = start_device(mpy_dir, config({"seconds": 6}), HEAP)
        wait_for(lambda: len(sub.readings()) >= 2)
        publish(pub, "down/cmd", encode_command(rogue, rogue.kid, "status", DEVICE, 2,
                                                expires))
        publish(pub, "down/cmd", encode_command(fleet, fleet.kid, "status", DEVICE, 3,
                                                expires))
        try:
            wait_for(lambda: len(sub.status()) >= 1)
            status_seen = True
        except AssertionError:
            status_seen = False
        # a command that finds no room to load the decoders is checked again later
        # (counted in mem_errors): what matters here is that each is obeyed once
        first = finish(proc, mem_errors_ok=True)
        assert status_seen, {k: first[k] for k in ("commands", "mem_errors", "last_error",
                                                   "sim_s", "connects")}
        assert first["boot"] == 1 and first["commands"] == 2, first  # desired, status
        assert first["batch_readings"] == 4, first
        assert len(sub.status()) == 1  # the forged command asked for one too: refused
        wait_for(lambda: len(sub.readings()) >= first["seq"] - first["stored"])
        seen = len(sub.readings())
        assert 4 in record_counts(sub.readings())  # the desired batch size, not 10

        second = finish(start_device(mpy_dir, config({"batches": 3}), HEAP),
                        mem_errors_ok=True)
        print("commands: MemoryErrors caught and the command retried: %d (boot 1), %d (boot 2)"
              % (first["mem_errors"], second["mem_errors"]))
        assert second["boot"] == 2, second
        assert second["commands"] == 0, second  # the retained desired again: a replay
        assert "replay" in second["last_error"], second
        assert second["batch_readings"] == 4, second  # remembered from the first boot
        wait_for(lambda: len(sub.readings()) >= second["seq"])
        seqs = check_chain(sub.readings(), creds)  # both boots: one unbroken chain
        assert seqs == list(range(1, second["seq"] + 1)), seqs
        assert max(record_counts(sub.readings()[seen:])) == 4
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.close()
