"""Firmware benchmark: what the real device agent sustains on the MicroPython unix port.

The agent (``firmware/cityedge_fw``, compiled to .mpy) runs under
``micropython -X heapsize=BENCH_HEAP`` (above the firmware tests' heap: this stand-in board
has 16 sensors, 32 readings per sweep, and the clock runs flat out) -- from
a ROMFS image mapped outside the heap (``cityedge.romfs``), as a board runs it from a
flash partition: bytecode stays out of the heap, module objects and names do not. It has
mTLS to a real Mosquitto and its ring buffer in a host directory. A stand-in board has
``SENSORS`` sensors of two readings each, so one sweep is one batch of the firmware's
default 32 readings; the schedule clock runs ``TIME_SCALE`` times fast, so the sampler
sweeps again as soon as it has signed and stored a batch. After ``WARMUP_S`` the counters
are read twice ``WINDOW_S`` apart: batches signed (sampled, signed, durable) and batches
acknowledged by the broker (PUBACK, removed from flash). The sustained rate is the smaller
of the two; the buffer depth at the end shows whether forwarding kept up.

Heap: the supervisor collects garbage every 50 ms and records the smallest free heap and
the largest heap in use after collection (module objects and names included). That is live
data at those moments, not the transient peak inside a signature: the unix port has no allocation
high-water mark (``micropython.mem_peak`` counts allocations the GC never reports freed).

Bytes on the wire per reading, from the batches an independent subscriber (paho) received
in the same run, against plain JSON over MQTT of the same readings: one JSON object per
reading, and one SenML-JSON array of the same records per batch. Counted: the MQTT 3.1.1
PUBLISH at QoS 1 with the agent's topic and its 4-byte PUBACK, plus one TLS 1.2 AES-GCM
record (29 bytes: header, explicit nonce, tag) per packet; TCP/IP headers are left out.
"""

from __future__ import annotations

import json
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
    device_argv,
)

from cityedge.mpy import compile_package, mpy_cross_path  # noqa: E402
from cityedge_core import cose, senml  # noqa: E402
from cityedge_core.batch import Batch  # noqa: E402

from support.mosquitto import Credentials, Mosquitto, TestPKI  # noqa: E402

SENSORS = 16  # stand-in sensors, two readings each: one sweep = one batch
BATCH_READINGS = 32  # the firmware's default (agent.DEFAULTS); see the module doc for 50
TIME_SCALE = 100_000  # the agent's largest accelerated clock: a 1 s interval becomes 1 ms
WARMUP_S = 4  # seconds before the window: connect, first batches
WINDOW_S = 10  # seconds measured
RUNS = 3
BENCH_HEAP = "96k"
TLS_RECORD_OVERHEAD = 29  # bytes: TLS 1.2 AES-GCM record header 5 + nonce 8 + tag 16
PUBACK_BYTES = 4  # MQTT 3.1.1 PUBACK packet

# The bench device: the real agent on a stand-in board (compiled to .mpy like the firmware).
DEVICE_SCRIPT = r'''
import asyncio, gc, json, os, sys, time
from cityedge_fw import main


class Sensor:
    def __init__(self, name):
        self.name = name
        self.n = 0

    def read(self):
        self.n += 1
        return [(self.name + "_t", "Cel", 20 + self.n % 7 / 4), (self.name + "_h", "%RH", 40)]


class Board:
    name = "bench"

    def __init__(self, cfg):
        self.cfg = cfg

    def device_id(self):
        return self.cfg["device"]

    def connect_network(self):
        return True

    def wdt_feed(self):
        pass

    def free_heap(self):
        return gc.mem_free()

    def ticks_ms(self):
        return time.ticks_ms()

    def unix_time(self):
        return int(time.time())

    def sensors(self, config):
        return [Sensor("s%02d" % i) for i in range(self.cfg["sensors"])]


async def supervise(agent, cfg, stats):
    task = asyncio.create_task(agent.run())
    start = time.ticks_ms()
    marks = []
    while True:
        await asyncio.sleep_ms(50)
        gc.collect()
        free, used = gc.mem_free(), gc.mem_alloc()
        stats["min_free"] = min(stats["min_free"], free)
        stats["max_used"] = max(stats["max_used"], used)
        t = time.ticks_diff(time.ticks_ms(), start)
        if agent.link.connects and not marks and t >= cfg["warmup_ms"]:
            marks.append((t, agent.batches_signed, agent.published))
        if task.done():  # the agent ended by itself: an error, not a measurement
            try:
                await task
                stats["agent_error"] = "returned"
            except Exception as e:
                stats["agent_error"] = repr(e)
            break
        if marks and t >= marks[0][0] + cfg["window_ms"]:
            marks.append((t, agent.batches_signed, agent.published))
            break
        if t > cfg["warmup_ms"] + cfg["window_ms"] + 30000:
            break
    task.cancel()
    await asyncio.sleep_ms(10)
    return marks


def run(path):
    with open(path) as f:
        cfg = json.load(f)
    agent = main.build(cfg, Board(cfg))
    for name in ("cityedge_fw.main", "json"):  # boot-only code off the heap, as on a board
        sys.modules.pop(name, None)
    gc.collect()
    stats = {"min_free": gc.mem_free(), "max_used": gc.mem_alloc(),
             "boot_used": gc.mem_alloc(), "heap": gc.mem_free() + gc.mem_alloc()}
    marks = asyncio.run(supervise(agent, cfg, stats))
    stats.update({"marks": marks, "stored": agent.store.count, "seq": agent.writer.seq,
                  "published": agent.published, "readings": agent.readings_total,
                  "last_error": agent.last_error or agent.link.last_error or ""})
    print("RESULT " + json.dumps(stats))


run(os.getenv("CE_CONFIG"))
'''


def compile_device(out: Path) -> Path:
    for package in ("cityedge_core", "cityedge_fw"):
        compile_package(ROOT / "firmware" / package, out)
    src = out / "bench_device.py"
    src.write_text(DEVICE_SCRIPT)
    subprocess.run([mpy_cross_path(), "-o", str(out / "bench_device.mpy"), "-s",
                    "bench_device.py", str(src)], check=True, capture_output=True)
    src.unlink()
    return out


def run_device(mpy: Path, work: Path, broker: Mosquitto, pki: TestPKI, creds: Credentials
               ) -> dict[str, Any]:
    cfg = {"device": DEVICE, "sensors": SENSORS, "warmup_ms": WARMUP_S * 1000,
           "window_ms": WINDOW_S * 1000,
           "broker": {"host": "127.0.0.1", "port": broker.port, "server_hostname": "localhost"},
           "tls": {"cert": str(creds.cert_der), "key": str(creds.key_der),
                   "ca": str(pki.ca_der)},
           "store": {"dir": str(work / "buffer"), "state": str(work / "state.cbor")},
           "agent": {"sample_interval_s": 1, "batch_readings": BATCH_READINGS,
                     "batch_seconds": 86400, "status_interval_s": 86400,
                     "time_scale": TIME_SCALE, "buffer_budget_bytes": 8 * 1024 * 1024}}
    path = work / "device.json"
    path.write_text(json.dumps(cfg))
    env = {"MICROPYPATH": ".frozen", "CE_CONFIG": str(path)}
    proc = subprocess.run(device_argv(mpy, "import bench_device", BENCH_HEAP), env=env,
                          capture_output=True, text=True,
                          timeout=WARMUP_S + WINDOW_S + 90)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError("bench: device failed:\n%s\n%s" % (proc.stdout, proc.stderr[-3000:]))
    r: dict[str, Any] = json.loads(lines[0][7:])
    if r.get("agent_error"):
        raise RuntimeError("bench: the agent ended during the run: %s" % r["agent_error"])
    if len(r["marks"]) != 2:
        raise RuntimeError("bench: device never connected: %s" % r)
    (t0, s0, p0), (t1, s1, p1) = r["marks"]
    dt = (t1 - t0) / 1000
    r["signed_per_s"] = (s1 - s0) / dt
    r["acked_per_s"] = (p1 - p0) / dt
    return r


def publish_bytes(topic: str, payload_len: int) -> int:
    """MQTT 3.1.1 PUBLISH QoS 1 (fixed header, topic, packet id, payload) + its PUBACK,
    each in one TLS record."""
    remaining = 2 + len(topic.encode()) + 2 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + varint + remaining + PUBACK_BYTES + 2 * TLS_RECORD_OVERHEAD


def wire_bytes(payloads: list[bytes]) -> dict[str, float]:
    """Per reading: our signed batches vs the same readings as plain JSON over MQTT."""
    topic = "ce/v1/%s/up/readings" % DEVICE
    ours = per_reading = per_batch = readings = payload = 0
    for data in payloads:
        b = Batch.decode(cose.decode_sign1(data).payload)
        if not b.records:
            continue
        readings += len(b.records)
        ours += publish_bytes(topic, len(data))
        payload += len(data)
        as_json = [senml.to_json_names(r) for r in b.records]
        per_batch += publish_bytes(topic, len(json.dumps(as_json, separators=(",", ":"))))
        for r in senml.resolve(b.records, validated=True):
            obj = {"n": r[senml.N], "u": r.get(senml.U), "v": r.get(senml.V),
                   "t": r[senml.T]}
            per_reading += publish_bytes(topic, len(json.dumps(obj, separators=(",", ":"))))
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
        runs = []
        wire: dict[str, float] = {}
        for i in range(RUNS):
            broker = Mosquitto(pki, work / ("broker%d" % i),
                               extra="max_queued_messages 1000000").start()
            sub = Subscriber(broker, pki)
            try:
                d = work / ("dev%d" % i)
                d.mkdir()
                r = run_device(mpy, d, broker, pki, creds)
                runs.append(r)
                if i == 0:
                    got = sub.readings()
                    check_chain(got, creds)
                    wire = wire_bytes(got)
            finally:
                sub.close()
                broker.cleanup()
    sustained = [min(r["signed_per_s"], r["acked_per_s"]) for r in runs]
    return {
        "heap": BENCH_HEAP, "tests_heap": HEAP, "runs": RUNS, "window_s": WINDOW_S,
        "batch_readings": BATCH_READINGS,
        "batches_per_s": statistics.median(sustained),
        "readings_per_s": statistics.median(sustained) * BATCH_READINGS,
        "signed_batches_per_s": statistics.median(r["signed_per_s"] for r in runs),
        "acked_batches_per_s": statistics.median(r["acked_per_s"] for r in runs),
        "buffered_at_end": [r["stored"] for r in runs],
        "heap_bytes": runs[0]["heap"],
        "boot_used_bytes": max(r["boot_used"] for r in runs),
        "peak_used_after_gc_bytes": max(r["max_used"] for r in runs),
        "min_free_bytes": min(r["min_free"] for r in runs),
        "wire": wire,
    }


def report(f: dict[str, Any]) -> None:
    w = f["wire"]
    print("\nFirmware agent on the MicroPython unix port (64-bit), heap %s (16-sensor "
          "stand-in board; the firmware tests run at %s),\ncode in a mapped ROMFS image as "
          "on a board's flash partition," % (f["heap"], f["tests_heap"]))
    print("%d-reading batches, real mTLS Mosquitto, median of %d runs of %d s:"
          % (f["batch_readings"], f["runs"], f["window_s"]))
    print("  sustained (signed, stored and PUBACKed) %8.1f batches/s = %.0f readings/s"
          % (f["batches_per_s"], f["readings_per_s"]))
    print("  signed and stored                       %8.1f batches/s" % f["signed_batches_per_s"])
    print("  acknowledged by the broker              %8.1f batches/s; buffered at end: %s"
          % (f["acked_batches_per_s"], f["buffered_at_end"]))
    print("  heap in use after boot                  %8d bytes of %d" % (f["boot_used_bytes"],
                                                                        f["heap_bytes"]))
    print("  largest heap in use after GC            %8d bytes; least free %d bytes"
          % (f["peak_used_after_gc_bytes"], f["min_free_bytes"]))
    print("Bytes on the wire per reading (%d readings; MQTT QoS 1 + PUBACK + TLS records):"
          % w["readings"])
    print("  signed CBOR batch (ours)                %8.1f  (payload alone %.1f)"
          % (w["ours_per_reading"], w["cbor_payload_per_reading"]))
    print("  plain JSON, one object per reading      %8.1f  (%.2fx ours)"
          % (w["json_object_per_reading"], w["json_object_per_reading"] / w["ours_per_reading"]))
    print("  plain SenML-JSON array per batch        %8.1f  (%.2fx ours)"
          % (w["json_array_per_batch_per_reading"],
             w["json_array_per_batch_per_reading"] / w["ours_per_reading"]))
