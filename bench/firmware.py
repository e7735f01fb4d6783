"""Firmware benchmark: what the real device agent sustains on the MicroPython unix port.

The agent (``firmware/cityedge_fw``, compiled to .mpy) runs on the firmware tests' stand-in
board (``tests/firmware/mp_device.py``) under ``micropython -X heapsize=BENCH_HEAP`` -- from
a ROMFS image mapped outside the heap (``cityedge.romfs``), as a board runs it from a
flash partition: bytecode stays out of the heap, module objects and names do not. It has
mTLS to a real Mosquitto and its ring buffer in a host directory. The board has
``SENSORS`` sensors of two readings each, batches of the firmware's default 32 readings;
the schedule clock runs ``TIME_SCALE`` times fast, so the sampler sweeps again as soon as
it has signed and stored a batch. After ``WARMUP_S`` the counters are read twice
``WINDOW_S`` apart: batches signed (sampled, signed, durable) and batches acknowledged by
the broker (PUBACK, removed from flash). The sustained rate is the smaller of the two; the
buffer depth at the end shows whether forwarding kept up.

Heap on the board's path (``board_path_heap``): the heap figure of the report is measured
as a board boots, not on the stand-in board: the built ``main.py`` (``make firmware``:
``main.boot()``, the unix HAL board with one simulated SHT3x, the same ``config.json`` as
``tests/firmware/test_boot.py``, the same order) at ``BOARD_HEAP`` (test_boot's
``BOOT_HEAP``), streaming ``BOARD_SECONDS`` at a real rate (a sweep a second, 10-reading
batches, the schedule clock 10 times fast) to an mTLS Mosquitto: heap in use after boot,
the most in use after a collection while streaming, the least free, the interned names and
their pools, MemoryErrors survived; every batch received is verified.

Throughput: ``BENCH_HEAP`` is the firmware tests' (``fw_harness.HEAP``: what the
stand-in board's boot path needs); the baseline is the same agent at ``BASELINE_HEAP``
(256 KiB), runs alternated, so the ratio says what the small heap costs. Flat out, signing
outruns forwarding, so a backlog builds on flash while the run lasts; the ring buffer's
index of it is runs of consecutive sequence numbers (a few small ints however long it
gets) and each batch is forwarded from one read buffer, so the backlog costs no heap. The
supervisor collects garbage every 50 ms and records the smallest free heap and the largest
heap in use after collection (module objects and names included). That is live data at
those moments, not the transient peak inside a signature: the unix port has no allocation
high-water mark (``micropython.mem_peak`` counts allocations the GC never reports freed).

Bytes on the wire per reading, from the batches an independent subscriber (paho) received
in the same run, against plain JSON over MQTT of the same readings: one JSON object per
reading, and one SenML-JSON array of the same records per batch. Counted: the MQTT 3.1.1
PUBLISH at QoS 1 with the agent's topic and its 4-byte PUBACK, plus a TLS 1.2 AES-GCM
record (29 bytes: header, explicit nonce, tag) per write: the agent writes a PUBLISH's
header and its payload separately (it never joins them in RAM), so three records per
batch; the JSON publishers one per packet. TCP/IP headers are left out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "tests", ROOT / "tests" / "firmware"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from fw_harness import (  # noqa: E402
    DEVICE,
    HEAP,
    MICROPYTHON,
    Subscriber,
    check_chain,
    compile_device,
    device_argv,
    device_env,
    qstr_pools,
)
from fw_harness import result as device_result  # noqa: E402

from cityedge import build_firmware  # noqa: E402
from cityedge_core import cose, senml  # noqa: E402
from cityedge_core.batch import Batch  # noqa: E402

from support.mosquitto import Credentials, Mosquitto, TestPKI  # noqa: E402

SENSORS = 4  # stand-in sensors, two readings each: four sweeps to a batch
BATCH_READINGS = 32  # the firmware's default (settings.DEFAULTS); see the module doc for 50
TIME_SCALE = 100_000  # the agent's largest accelerated clock: a 1 s interval becomes 1 ms
WARMUP_S = 4  # seconds before the window: connect, first batches
WINDOW_S = 10  # seconds measured
RUNS = 3
BENCH_HEAP = HEAP  # the firmware tests' heap (``fw_harness.HEAP``; CE_TEST_HEAP overrides)
BOARD_HEAP = os.environ.get("CE_BOOT_HEAP", "64k")  # test_boot's BOOT_HEAP
BOARD_SECONDS = 30
BASELINE_HEAP = "256k"  # the same agent with room to spare: what the small heap costs
TLS_RECORD_OVERHEAD = 29  # bytes: TLS 1.2 AES-GCM record header 5 + nonce 8 + tag 16
PUBACK_BYTES = 4  # MQTT 3.1.1 PUBACK packet

def run_device(mpy: Path, work: Path, broker: Mosquitto, pki: TestPKI, creds: Credentials,
               heap: str = BENCH_HEAP) -> dict[str, Any]:
    cfg = {"device": DEVICE, "sensors": SENSORS, "clock": True,
           "stop": {"window": {"warmup_ms": WARMUP_S * 1000, "length_ms": WINDOW_S * 1000},
                    "seconds": WARMUP_S + WINDOW_S + 30},
           "broker": {"host": "127.0.0.1", "port": broker.port, "server_hostname": "localhost"},
           "tls": {"cert": str(creds.cert_der), "key": str(creds.key_der),
                   "ca": str(pki.ca_der)},
           "store": {"dir": str(work / "buffer"), "state": str(work / "state.cbor")},
           "agent": {"sample_interval_s": 1, "batch_readings": BATCH_READINGS,
                     "batch_seconds": 86400, "status_interval_s": 86400,
                     "time_scale": TIME_SCALE, "buffer_budget_bytes": 8 * 1024 * 1024}}
    path = work / "device.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(device_argv(mpy, "import mp_device", heap),
                          env=device_env(mpy, path), capture_output=True, text=True,
                          timeout=WARMUP_S + WINDOW_S + 90)
    r = device_result(proc.stdout)
    if proc.returncode != 0 or r is None:  # the agent ended: an error, not a measurement
        raise RuntimeError("bench: the device failed (heap %s):\n%s\n%s"
                           % (heap, proc.stdout[-2000:], proc.stderr[-3000:]))
    if len(r["marks"]) != 2:
        raise RuntimeError("bench: the device never connected: %s" % r)
    (t0, s0, p0), (t1, s1, p1) = r["marks"]
    dt = (t1 - t0) / 1000
    r["signed_per_s"] = (s1 - s0) / dt
    r["acked_per_s"] = (p1 - p0) / dt
    return r


# The built main.py's boot (``main.boot``) with the agent run by this supervisor instead
# of the board's own loop: heap after boot, then every 50 ms a collection and the figures.
# Its names are ones the firmware interns anyway (``boot``, ``seq``, ``tick``, ...), so the
# name count is the board's.
BOARD_PROGRAM = """
import gc, micropython, time, asyncio
from cityedge_fw import main
def boot(agent):
    gc.collect()
    print("BOOT %%d" %% gc.mem_alloc())
    micropython.qstr_info()
    seq = [0, 1 << 30]
    async def tick():
        tasks = asyncio.create_task(agent.run())
        size = time.ticks_ms()
        while time.ticks_diff(time.ticks_ms(), size) < %d:
            await asyncio.sleep_ms(50)
            gc.collect()
            if gc.mem_alloc() > seq[0]: seq[0] = gc.mem_alloc()
            if gc.mem_free() < seq[1]: seq[1] = gc.mem_free()
            if tasks.done():
                break
        tasks.cancel()
    agent.board.connect_network()
    asyncio.run(tick())
    print("PEAK %%d %%d %%d %%d" %% (seq[0], seq[1], agent.published, agent.mem_errors))
    micropython.qstr_info()
main.boot(boot)
"""


def board_path_heap(work: Path, pki: TestPKI, creds: Credentials,
                    heap: str = BOARD_HEAP) -> dict[str, Any]:
    """The board's boot path (module doc): heap after boot and while streaming."""
    out = work / "build" / "firmware"
    out.mkdir(parents=True)
    build_firmware.build(out)
    broker = Mosquitto(pki, work / "board-broker", clients=[DEVICE]).start()
    sub = Subscriber(broker, pki)
    flash = work / "board-flash"
    flash.mkdir()
    for src, name in ((creds.cert_der, "cert.der"), (creds.key_der, "key.der"),
                      (pki.ca_der, "ca.der")):
        shutil.copy(src, flash / name)
    (flash / "config.json").write_text(json.dumps({
        "device": DEVICE,
        "broker": {"host": "127.0.0.1", "port": broker.port, "server_hostname": "localhost"},
        "tls": {"cert": str(flash / "cert.der"), "key": str(flash / "key.der"),
                "ca": str(flash / "ca.der")},
        "store": {"dir": str(flash / "buffer"), "state": str(flash / "state.cbor")},
        "sensors": [{"type": "sht3x", "name": "air", "i2c": 0, "sda": 21, "scl": 22}],
        "agent": {"sample_interval_s": 1, "batch_readings": 10, "time_scale": 10,
                  "status_interval_s": 5}}))
    argv = [sys.executable, "-m", "cityedge.romfs", "--image", str(out.with_name("firmware.romfs")),
            "-X", "heapsize=" + heap, "-c", BOARD_PROGRAM % (BOARD_SECONDS * 1000)]
    env = {"MICROPYPATH": ".frozen", "PATH": os.environ.get("PATH", ""),
           "CITYEDGE_FLASH": str(flash)}
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=BOARD_SECONDS + 120)
        boot = re.search(r"^BOOT (\d+)$", proc.stdout, re.M)
        peak = re.search(r"^PEAK (\d+) (\d+) (\d+) (\d+)$", proc.stdout, re.M)
        if proc.returncode != 0 or boot is None or peak is None:
            raise RuntimeError("bench: the board's path failed at heap %s:\n%s\n%s"
                               % (heap, proc.stdout[-2000:], proc.stderr[-3000:]))
        batches = len(check_chain(sub.readings(), creds))
    finally:
        sub.close()
        broker.cleanup()
    pools = qstr_pools(proc.stdout)
    return {"heap": heap, "seconds": BOARD_SECONDS, "boot_used_bytes": int(boot.group(1)),
            "peak_used_after_gc_bytes": int(peak.group(1)),
            "min_free_bytes": int(peak.group(2)), "published": int(peak.group(3)),
            "mem_errors": int(peak.group(4)), "verified_batches": batches,
            "qstr_pools": pools[0][0], "names": pools[0][1],
            "names_at_end": pools[-1][1], "memory_error_printed": "MemoryError" in
            proc.stdout + proc.stderr}


def publish_bytes(topic: str, payload_len: int, writes: int) -> int:
    """MQTT 3.1.1 PUBLISH QoS 1 (fixed header, topic, packet id, payload) in ``writes``
    TLS records, and its PUBACK in one."""
    remaining = 2 + len(topic.encode()) + 2 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + varint + remaining + PUBACK_BYTES + (writes + 1) * TLS_RECORD_OVERHEAD


def wire_bytes(payloads: list[bytes]) -> dict[str, float]:
    """Per reading: our signed batches vs the same readings as plain JSON over MQTT."""
    topic = "ce/v1/%s/up/readings" % DEVICE
    ours = per_reading = per_batch = readings = payload = 0
    for data in payloads:
        b = Batch.decode(cose.decode_sign1(data).payload)
        if not b.records:
            continue
        readings += len(b.records)
        ours += publish_bytes(topic, len(data), 2)  # header, then payload
        payload += len(data)
        as_json = [senml.to_json_names(r) for r in b.records]
        per_batch += publish_bytes(topic, len(json.dumps(as_json, separators=(",", ":"))), 1)
        for r in senml.resolve(b.records, validated=True):
            obj = {"n": r[senml.N], "u": r.get(senml.U), "v": r.get(senml.V),
                   "t": r[senml.T]}
            per_reading += publish_bytes(topic, len(json.dumps(obj, separators=(",", ":"))), 1)
    return {"readings": readings, "cbor_payload_per_reading": payload / readings,
            "ours_per_reading": ours / readings,
            "json_object_per_reading": per_reading / readings,
            "json_array_per_batch_per_reading": per_batch / readings}


def firmware_bench() -> dict[str, Any]:
    if not MICROPYTHON.exists():
        raise SystemExit("bench: %s missing: run `make setup`" % MICROPYTHON)
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-fw-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        mpy = compile_device(work / "mpy")
        pki = TestPKI(work / "pki")
        creds = pki.issue_client(DEVICE)
        board = board_path_heap(work, pki, creds)
        runs: list[dict[str, Any]] = []
        baseline: list[dict[str, Any]] = []
        wire: dict[str, float] = {}
        # alternated, so the machine's load drifts over both alike
        for i, heap in enumerate([BENCH_HEAP, BASELINE_HEAP] * RUNS):
            broker = Mosquitto(pki, work / ("broker%d" % i), clients=[DEVICE],
                               extra="max_queued_messages 1000000").start()
            sub = Subscriber(broker, pki)
            try:
                d = work / ("dev%d" % i)
                d.mkdir()
                r = run_device(mpy, d, broker, pki, creds, heap)
                (runs if heap == BENCH_HEAP else baseline).append(r)
                if i == 0:
                    got = sub.readings()
                    check_chain(got, creds)
                    wire = wire_bytes(got)
            finally:
                sub.close()
                broker.cleanup()
    sustained = [min(r["signed_per_s"], r["acked_per_s"]) for r in runs]
    roomy = statistics.median(min(r["signed_per_s"], r["acked_per_s"]) for r in baseline)
    return {
        "heap": BENCH_HEAP, "tests_heap": HEAP, "runs": RUNS, "window_s": WINDOW_S,
        "baseline_heap": BASELINE_HEAP, "baseline_batches_per_s": roomy,
        "baseline_peak_used_after_gc_bytes": max(r["max_alloc"] for r in baseline),
        "batch_readings": BATCH_READINGS,
        "batches_per_s": statistics.median(sustained),
        "readings_per_s": statistics.median(sustained) * BATCH_READINGS,
        "signed_batches_per_s": statistics.median(r["signed_per_s"] for r in runs),
        "acked_batches_per_s": statistics.median(r["acked_per_s"] for r in runs),
        "buffered_at_end": [r["stored"] for r in runs],
        "mem_errors": [r["mem_errors"] for r in runs],
        "baseline_mem_errors": [r["mem_errors"] for r in baseline],
        "heap_bytes": runs[0]["heap"],
        "boot_used_bytes": max(r["boot_alloc"] for r in runs),
        "peak_used_after_gc_bytes": max(r["max_alloc"] for r in runs),
        "min_free_bytes": min(r["min_free"] for r in runs),
        "wire": wire,
        "board_path": board,
    }


def report(f: dict[str, Any]) -> None:
    w = f["wire"]
    print("\nFirmware agent on the MicroPython unix port (64-bit), heap %s (%d-sensor "
          "stand-in board; the firmware tests run at %s),\ncode in a mapped ROMFS image as "
          "on a board's flash partition," % (f["heap"], SENSORS, f["tests_heap"]))
    print("%d-reading batches, real mTLS Mosquitto, median of %d runs of %d s:"
          % (f["batch_readings"], f["runs"], f["window_s"]))
    print("  sustained (signed, stored and PUBACKed) %8.1f batches/s = %.0f readings/s"
          % (f["batches_per_s"], f["readings_per_s"]))
    print("  the same agent at heap %-5s             %8.1f batches/s (%.2fx: what the small "
          "heap costs)" % (f["baseline_heap"], f["baseline_batches_per_s"],
                           f["batches_per_s"] / f["baseline_batches_per_s"]))
    print("  signed and stored                       %8.1f batches/s" % f["signed_batches_per_s"])
    print("  acknowledged by the broker              %8.1f batches/s; buffered at end: %s"
          % (f["acked_batches_per_s"], f["buffered_at_end"]))
    print("  heap in use after boot                  %8d bytes of %d" % (f["boot_used_bytes"],
                                                                        f["heap_bytes"]))
    print("  MemoryErrors survived, per run          %8s (at %s: %s; a batch that finds no "
          "room is signed at the next reading)" % (f["mem_errors"], f["baseline_heap"],
                                                   f["baseline_mem_errors"]))
    print("  largest heap in use after GC            %8d bytes; least free %d bytes"
          % (f["peak_used_after_gc_bytes"], f["min_free_bytes"]))
    b = f["board_path"]
    print("The board's boot path (built main.py, unix HAL board, one SHT3x), heap %s, %d s "
          "streaming:" % (b["heap"], b["seconds"]))
    print("  heap in use after boot                  %8d bytes; %d interned names in %d pools"
          % (b["boot_used_bytes"], b["names"], b["qstr_pools"]))
    print("  largest heap in use after GC            %8d bytes; least free %d bytes"
          % (b["peak_used_after_gc_bytes"], b["min_free_bytes"]))
    print("  batches verified / acknowledged         %8d / %d; MemoryErrors survived %d"
          % (b["verified_batches"], b["published"], b["mem_errors"]))
    print("Bytes on the wire per reading (%d readings; MQTT QoS 1 + PUBACK + TLS records):"
          % w["readings"])
    print("  signed CBOR batch (ours)                %8.1f  (payload alone %.1f)"
          % (w["ours_per_reading"], w["cbor_payload_per_reading"]))
    print("  plain JSON, one object per reading      %8.1f  (%.2fx ours)"
          % (w["json_object_per_reading"], w["json_object_per_reading"] / w["ours_per_reading"]))
    print("  plain SenML-JSON array per batch        %8.1f  (%.2fx ours)"
          % (w["json_array_per_batch_per_reading"],
             w["json_array_per_batch_per_reading"] / w["ours_per_reading"]))
