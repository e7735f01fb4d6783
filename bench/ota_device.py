"""The device's artifact download on the MicroPython unix port (``make bench``; alone:
``python -m bench.ota_device``).

**What is measured**: the firmware's own download step, ``update_boot.download`` (the
code a board runs at boot in state ``downloading``, before the agent is built), compiled
to .mpy and run from the ROMFS image on the unix port at the update tests' heap
(``ota_harness.UPDATE_HEAP``): Range requests of ``RANGE_BYTES`` over TLS (the device's
mTLS context: ``mqtt_async.tls_context`` with its certificate, key and the city CA), each
piece through SHA-256 and appended to the slot's image file (closed after every request),
the digest compared with the manifest's, then the slot marked for trial
(``update_slots.start_trial``; on a board the reset follows). Also reported: the heap in
use after a collection between requests, at most (the step prints it: ``update: download
heap peak``; the whole update's boot measures it too, ``tests/firmware/test_update.py``).

**The update's boot steps** (``check_min_heap``, ``--check`` alone): the fetch, the
check and the download as a board boots them (``main.main`` on the tests' stand-in
board, one process per boot) at 64 KiB, the heap the agent streams in; and the smallest
heap the check step (``update_verify``, the update's peak) completes in, by bisection.

**Baseline in the same run, same interpreter**: a plain download of the same file from
the same server (``update_http.get`` for the whole file in one request over the same TLS
context, every byte read into the same 512-byte buffer and dropped: no hash, no file, no
Range pieces). The ratio is what the device's checks and durability cost over the
transport it cannot skip. Server: ``tests/support/artifact_server`` (HTTPS, Range) on
loopback. The download is also run with 8 KiB requests (the default before this bench
showed what each request's TLS handshake costs). ``RUNS`` of each, in rotated order,
medians.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "tests", ROOT / "tests" / "firmware", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from fw_harness import compile_device, device_argv, device_config, device_env  # noqa: E402
from ota_harness import HW_CLASS, UPDATE_HEAP, Releases  # noqa: E402

from cityedge_fw.update_boot import RANGE_BYTES  # noqa: E402

from support.artifact_server import ArtifactServer  # noqa: E402
from support.mosquitto import TestPKI  # noqa: E402

ARTIFACT_BYTES = 1 << 20  # 1 MiB: a firmware image's order of size
KINDS = ["plain", "device", "device-8k"]
STEPS = {"device": RANGE_BYTES, "device-8k": 8192}
RUNS = 3
QUICK_BYTES = 64 * 1024

# Runs on the device. CFG: the run's settings (a JSON file). Prints one JSON line.
PROGRAM = """
import asyncio, gc, json, time
from cityedge_fw import update_boot, update_http, update_slots
from cityedge_fw.keys import read_file
from cityedge_fw.mqtt_async import tls_context
c = json.loads(open(%(cfg)r).read())
ctx = tls_context(read_file(c["cert"]), read_file(c["key"]), read_file(c["ca"]))
pend = {"slot": "b", "size": c["size"], "version": "9.9.9", "seq": 9, "keys": 1,
        "sha256": c["sha256"], "url": c["url"], "state": "downloading"}
def plain():
    buf = bytearray(512)
    got = [0]
    def sink(mv):
        got[0] += len(mv)
    n = asyncio.run(update_http.get(c["url"] + "artifact", 0, c["size"] - 1, ctx, buf,
                                    sink, 60000, c["size"]))
    return n, got[0]
def device(step):
    update_slots.remove(update_slots.image_path(c["dir"], "b"))
    update_slots.write_pointer(c["dir"], {"slot": "a", "seq": 0})
    asyncio.run(update_boot.download({"dir": c["dir"], "range_bytes": step}, dict(pend), ctx))
    return bool(update_slots.read_pointer(c["dir"])["trial"])
out = {}
for kind in c["order"]:
    gc.collect()
    t0 = time.ticks_ms()
    if kind == "plain":
        n, got = plain()
        ok = n == got == c["size"]
    else:
        ok = device(c["steps"][kind])
    out.setdefault(kind, []).append([time.ticks_diff(time.ticks_ms(), t0), ok])
print("BENCH " + json.dumps(out))
"""


def run(quick: bool = False) -> dict[str, Any]:
    size = QUICK_BYTES if quick else ARTIFACT_BYTES
    runs = 1 if quick else RUNS
    body = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-otadev-") as d:
        work = Path(d)
        pki = TestPKI(work / "pki")
        creds = pki.issue_client("urn:dev:mac:0024befffe80bec1")
        mpy = compile_device(work / "mpy")
        server = ArtifactServer(pki, body, files={})
        peaks: list[int] = []
        try:
            results: dict[str, list[float]] = {k: [] for k in KINDS}
            for i in range(runs):
                order = KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]
                flash = work / ("flash%d" % i)
                flash.mkdir()
                cfg = work / ("run%d.json" % i)
                cfg.write_text(json.dumps({
                    "cert": str(creds.cert_der), "key": str(creds.key_der),
                    "ca": str(pki.ca_der), "dir": str(flash), "size": size,
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "url": server.url.rsplit("/", 1)[0] + "/", "order": order,
                    "steps": STEPS}))
                proc = subprocess.run(device_argv(mpy, PROGRAM % {"cfg": str(cfg)},
                                                  UPDATE_HEAP),
                                      capture_output=True, text=True, timeout=900,
                                      env={"MICROPYPATH": ".frozen",
                                           "PATH": os.environ.get("PATH", "")})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")),
                            None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit("bench: the device download failed (%d):\n%s%s"
                                     % (proc.returncode, proc.stdout[-2000:],
                                        proc.stderr[-2000:]))
                got = json.loads(line[6:])
                peaks += [int(x) for x in re.findall(r"update: download heap peak (\d+)",
                                                     proc.stdout)]
                if sorted(got) != sorted(KINDS):
                    raise SystemExit("bench: the device ran %s" % sorted(got))
                for kind, [[ms, ok]] in got.items():
                    if not ok:
                        raise SystemExit("bench: the %s download did not complete" % kind)
                    results[kind].append(ms / 1000)
                image = flash / "slot_b" / "firmware.romfs"
                if image.read_bytes() != body:
                    raise SystemExit("bench: the slot's image is not the artifact")
        finally:
            server.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"bytes": size, "runs": runs, "heap": UPDATE_HEAP, "range": RANGE_BYTES,
            "heap_peak": max(peaks) if peaks else None,
            "bytes_per_s": {k: size / t for k, t in med.items()},
            "ratio": {k: med["plain"] / t for k, t in med.items()}, "seconds": results}


# The check step's heaps (KiB): the smallest one it completes in is searched between these
CHECK_LOW, CHECK_HIGH = 40, 96
STEP_HEAP = 64  # KiB: the heap the agent streams in (issue 15's target for an update)
_STAGE = re.compile(r"update: check heap (\d+) at start, (\d+) after the verdict")


def boot_steps(work: Path, mpy: Path, heap_kib: int, server: ArtifactServer | None = None,
               pki: TestPKI | None = None) -> dict[str, Any]:
    """The update's boot steps as a board boots them (``main.main`` on the tests'
    stand-in board, code from the ROMFS image, one process per boot, ``heap_kib`` each):
    with ``server``, from ``scheduled`` (the manifest and key list fetched over TLS), then
    the check, then the download (32 KiB Range requests into slot b) until the trial is
    set; without, the check alone on files put on flash (``checking``). A list signed by
    2 of 3 roots, one release key. ``passed``: every step completed (the check's verdict
    ``ok``; with a server, the pointer names slot b's verified image as the trial);
    ``heap``: the check's figures (``update: check heap``: in use after a collection at
    its start and after its verdict), ``download``: the download step's peak."""
    tmp = work / ("steps-%d-%s" % (heap_kib, "net" if server else "check"))
    tmp.mkdir()
    pki = pki or TestPKI(tmp / "pki")  # (the server's, with a server)
    creds = pki.issue_client("urn:dev:mac:0024befffe80bec1")
    releases = Releases(tmp)
    artifact = tmp / "artifact"
    artifact.write_bytes(server.body if server else os.urandom(QUICK_BYTES))
    manifest = releases.manifest(artifact, "1.1.0", 2)

    class NoBroker:
        port = 1  # the boots reset after each step: no broker connection is made

    config = device_config(tmp, NoBroker, pki, creds, {"seconds": 1}, clock=True)
    cfg = json.loads(config.read_text())
    flash = tmp / "flash"
    cfg["update"] = {"dir": str(flash), "root_set": str(releases.root_file),
                     "hw_class": HW_CLASS, "flash_budget": 1 << 20}
    config.write_text(json.dumps(cfg))
    env = device_env(mpy, config)  # (makes the flash directory, writes config.json)
    pend = {"state": "checking", "url": "https://localhost:1/releases/r/",
            "digest": hashlib.sha256(manifest).hexdigest(), "now": releases.now, "cmd": 1}
    if server:
        server.files.update(manifest=manifest, keys=releases.keys)
        pend.update(state="scheduled", url="https://localhost:%d/releases/r/" % server.port)
    else:
        (flash / "update").mkdir()
        (flash / "update" / "manifest").write_bytes(manifest)
        (flash / "update" / "keys").write_bytes(releases.keys)
    (flash / "update.json").write_text(json.dumps(pend))
    out = []
    for _boot in range(3 if server else 1):
        proc = subprocess.run(device_argv(mpy, "import mp_device", "%dk" % heap_kib),
                              env=env, capture_output=True, text=True, timeout=300)
        out.append(proc.stdout + proc.stderr)
        state = json.loads((flash / "update.json").read_text()).get("state")
        if proc.returncode != 0 or state == "done":
            break
    log = "\n".join(out)
    m = _STAGE.search(log)
    peak = re.search(r"update: download heap peak (\d+)", log)
    if server:
        trial = json.loads((flash / "boot.json").read_text()).get("trial") \
            if (flash / "boot.json").exists() else None
        image = flash / "slot_b" / "firmware.romfs"
        passed = bool(trial) and image.exists() and image.read_bytes() == server.body
    else:
        passed = state == "downloading"
    return {"passed": passed, "heap": [int(m[1]), int(m[2])] if m else None,
            "download": int(peak[1]) if peak else None,
            "stages": re.findall(r"update: boot stage (\w+) took (\d+) ms", log),
            "output": log[-4000:]}


def check_min_heap(quick: bool = False) -> dict[str, Any]:
    """The smallest heap (whole KiB) the check step completes in (a bisection of
    ``boot_steps`` without a server), its figures at the update tests' heap and at
    ``STEP_HEAP``, and the three boot steps (fetch, check, download) at ``STEP_HEAP``."""
    tests_heap = int(UPDATE_HEAP.rstrip("k"))
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-otacheck-") as d:
        work = Path(d)
        mpy = compile_device(work / "mpy")
        pki = TestPKI(work / "pki")
        with ArtifactServer(pki, os.urandom(QUICK_BYTES), files={}) as server:
            steps = boot_steps(work, mpy, STEP_HEAP, server, pki)
        at = {h: boot_steps(work, mpy, h) for h in sorted({tests_heap, STEP_HEAP})}
        low, high = CHECK_LOW, CHECK_HIGH  # fails at low (assumed), passes at high
        if at[STEP_HEAP]["passed"]:
            high = STEP_HEAP
        else:
            low = STEP_HEAP
        while high - low > 1:
            mid = (low + high) // 2
            r = at[mid] if mid in at else boot_steps(work, mpy, mid)
            at[mid] = r
            if r["passed"]:
                high = mid
            else:
                low = mid
    return {"min_heap_kib": high, "at_step_heap": at[STEP_HEAP]["passed"],
            "heap_at_tests": at[tests_heap]["heap"], "heap_at_step": at[STEP_HEAP]["heap"],
            "tried": {h: r["passed"] for h, r in sorted(at.items())},
            "steps": {"passed": steps["passed"], "stages": steps["stages"],
                      "check_heap": steps["heap"], "download_peak": steps["download"]},
            "steps_output": None if steps["passed"] else steps["output"]}


def report(r: dict[str, Any]) -> None:
    print("\nDevice artifact download on the MicroPython unix port (heap %s, %d bytes, "
          "median of %d), against a plain download in the same run:"
          % (r["heap"], r["bytes"], r["runs"]))
    rows = [("plain", "plain: one GET, same TLS and server, bytes dropped"),
            ("device", "update_boot.download, %d KiB requests (default)" % (r["range"] >> 10)),
            ("device-8k", "update_boot.download, 8 KiB requests")]
    for kind, what in rows:
        print("  %-58s %9.0f B/s  %.2fx" % (what, r["bytes_per_s"][kind], r["ratio"][kind]))
    print("  device heap in use while downloading, at most (after a collection): %s bytes"
          % r["heap_peak"])


def report_check(c: dict[str, Any]) -> None:
    print("\nThe update's boot steps on the real boot path (``main.main`` on the stand-in "
          "board, ROMFS, one process per boot):")
    st = c["steps"]
    print("  fetch, check and download at %d KiB: %s (stages %s ms; the check's heap in "
          "use %s bytes at its start and after its verdict; download peak %s bytes)"
          % (STEP_HEAP, "all complete" if st["passed"] else "FAILED",
             [int(ms) for _s, ms in st["stages"]], st["check_heap"], st["download_peak"]))
    print("  the check alone: smallest heap it completes in %d KiB; tried %s"
          % (c["min_heap_kib"], c["tried"]))
    if c["heap_at_tests"]:
        print("  the check's heap in use after a collection at %s: %d bytes at its start, "
              "%d after its verdict (its modules loaded)" % (UPDATE_HEAP, *c["heap_at_tests"]))
    if c["steps_output"]:
        print(c["steps_output"])


def main() -> None:
    quick = "--quick" in sys.argv
    if "--check" not in sys.argv:
        report(run(quick=quick))
    if "--download" not in sys.argv:
        report_check(check_min_heap(quick))


if __name__ == "__main__":
    main()
