"""Run every benchmark and print the figures with their baselines (medians of several runs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import brokers as brokers_bench
from bench import campaign as campaign_bench
from bench import city as city_bench
from bench import console as console_bench
from bench import core, firmware, gateway
from bench import fleet as fleet_bench
from bench import opendata as opendata_bench
from bench import ota as ota_bench
from bench import ota_device as ota_device_bench
from bench import rotation as rotation_bench
from bench import scale_queries as scale_queries_bench
from bench import scaling as scaling_bench
from bench.machine import describe

# (key in build/bench.json, run, report): each part prints its figures with its baseline
PARTS: list[tuple[str, Callable[[], Any], Callable[[Any], None]]] = [
    ("fleet", fleet_bench.run, fleet_bench.report),
    ("console", console_bench.run, console_bench.report),
    ("scale_queries", scale_queries_bench.run, scale_queries_bench.report),
    ("opendata", opendata_bench.run, opendata_bench.report),
    ("ingest_scaling", scaling_bench.run, scaling_bench.report),
    ("rotation", rotation_bench.run, rotation_bench.report),
    ("campaign", campaign_bench.run, campaign_bench.report),
    ("ota", ota_bench.run, ota_bench.report),
    ("ota_device", ota_device_bench.run, ota_device_bench.report),
    ("ota_device_steps", ota_device_bench.check_min_heap, ota_device_bench.report_check),
    ("firmware", firmware.firmware_bench, firmware.report),
    ("gateway", gateway.gateway_bench, gateway.report),
    ("brokers", brokers_bench.run, brokers_bench.report),
    ("city", city_bench.run, city_bench.report),
]


def main() -> None:
    print("cityedge bench on %s" % describe())
    results: dict[str, object] = {"machine": describe()}
    v = core.cpython_verify()
    results["core_verify"] = v
    print("\nCore verify path, 50-reading batches (%d bytes), median of %d runs:"
          % (v["batch_bytes"], core.RUNS))
    print("  raw OpenSSL ES256 verify (baseline)  %10.0f /s" % v["raw_openssl_verify_per_s"])
    print("  cityedge full verify path            %10.0f batches/s = %.0f readings/s"
          % (v["ours_batches_per_s"], v["ours_readings_per_s"]))
    print("  ratio ours / raw                     %10.2f  (target >= 0.50)" % v["ratio"])
    print("  same path with the pure-Python core decoder: %.0f batches/s"
          % v["pure_core_decoder_batches_per_s"])
    m = core.micropython_sign()
    results["micropython_sign"] = m
    print("\nMicroPython unix port, one 50-reading batch:")
    print("  sign time (median of 21)             %10.1f ms" % m["mp_sign_ms"])
    print("  smallest heap that signs, code in ROMFS (as on a board) %4d KiB  (target <= 32)"
          % m["mp_min_heap_kib"])
    print("  smallest heap that signs, code loaded into the heap     %4d KiB"
          % m["mp_min_heap_files_kib"])
    for key, run, report in PARTS:
        r = run()
        results[key] = r
        report(r)
    out = Path("build") / "bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\nwritten %s" % out)


if __name__ == "__main__":
    main()
