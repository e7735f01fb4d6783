"""Soak: 30 minutes of device time (accelerated clock) on the unix port, streaming to a
real broker, with a flaky sensor: no MemoryError and a flat heap after collection."""

from __future__ import annotations

import pytest
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

from support.mosquitto import Mosquitto, TestPKI

SIM_SECONDS = 30 * 60
TIME_SCALE = 60  # 30 simulated minutes in about 30 s


@pytest.mark.slow
def test_soak_30_simulated_minutes(mosquitto: Mosquitto, pki: TestPKI, mpy_dir: object,
                                   tmp_path: object) -> None:
    from pathlib import Path

    tmp = Path(str(tmp_path))
    creds = pki.issue_client(DEVICE)
    mosquitto.grant(DEVICE)
    sub = Subscriber(mosquitto, pki)
    try:
        cfg = device_config(tmp, mosquitto, pki, creds, {"seconds": SIM_SECONDS / TIME_SCALE},
                            sample_interval_s=10, batch_readings=32, status_interval_s=60,
                            time_scale=TIME_SCALE, fail_every=50)
        result = finish(start_device(Path(str(mpy_dir)), cfg), timeout=120)
        assert result["sim_s"] >= SIM_SECONDS * 0.95, result
        assert result["faults"] >= 3 and result["batches"] >= 9, result
        alloc = result["alloc"]
        third = len(alloc) // 3
        assert third >= 5, alloc
        # flat: the last third of the run needs no more heap than the first third (+1 KiB);
        # the samples are taken while the link sends nothing (``mp_device.supervise``)
        assert max(alloc[-third:]) <= max(alloc[:third]) + 1024, alloc
        print("soak: heap %s, boot alloc %d B, peak alloc %d B, min free %d B, %d batches,"
              " heap in use %s" % (HEAP, result["boot_alloc"], max(alloc), result["min_free"],
                                   result["batches"], alloc))
        wait_for(lambda: len(sub.readings()) >= result["seq"] - result["stored"])
        check_chain(sub.readings(), creds)
    finally:
        sub.close()
