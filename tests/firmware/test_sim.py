"""``cityedge sim device``: the real firmware on the unix port, flash in a LittleFS image
file; two runs are two boots of the same device (the chain continues across the reboot)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from fw_harness import DEVICE, Subscriber, check_chain, wait_for

from support.mosquitto import Mosquitto, TestPKI


def sim(config: Path, seconds: float) -> str:
    # the timeout guards against a hang; it is no speed test (a loaded machine needed > 60 s)
    done = subprocess.run([sys.executable, "-m", "cityedge.cli", "sim", "device", "--config",
                           str(config), "--seconds", str(seconds)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_sim_device_streams_and_survives_a_reboot(mosquitto: Mosquitto, pki: TestPKI,
                                                  tmp_path: Path, micropython: str) -> None:
    creds = pki.issue_client(DEVICE)
    mosquitto.grant(DEVICE)
    for src, name in ((creds.cert_der, "dev.crt.der"), (creds.key_der, "dev.key.der"),
                      (pki.ca_der, "ca.der")):
        shutil.copy(src, tmp_path / name)
    config = tmp_path / "device.json"
    config.write_text(json.dumps({
        "device": DEVICE,
        "broker": {"host": "127.0.0.1", "port": mosquitto.port, "server_hostname": "localhost"},
        "tls": {"cert": "dev.crt.der", "key": "dev.key.der", "ca": "ca.der"},
        "image": {"path": "flash.img", "blocks": 64},
        "sensors": [{"type": "sht3x", "name": "air", "i2c": 0, "sda": 21, "scl": 22},
                    {"type": "adc", "name": "noise", "pin": 34, "unit": "dB"}],
        "agent": {"sample_interval_s": 1, "batch_readings": 5, "time_scale": 10,
                  "status_interval_s": 5},
    }))
    sub = Subscriber(mosquitto, pki)
    try:
        first = sim(config, 4)
        assert "boot 1 " in first and "chain at seq 0" in first, first
        assert (tmp_path / "flash.img").stat().st_size == 64 * 4096
        wait_for(lambda: len(sub.readings()) >= 2)
        second = sim(config, 3)
        # the second boot continues the chain where the first stopped
        assert "boot 2 " in second, second
        head = int(second.split("chain at seq ")[1].split(",")[0])
        assert head >= 2
        wait_for(lambda: len(sub.readings()) > head)
        seqs = check_chain(sub.readings(), creds)
        assert seqs[: head + 1] == list(range(1, head + 2))
        assert "seq=" in second and "published=" in second
        assert "on unix" in first  # the unix HAL with simulated parts on simulated buses
    finally:
        sub.close()


def test_sim_reports_a_bad_config_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "device.json"
    bad.write_text('{"broker": {}}')
    done = subprocess.run([sys.executable, "-m", "cityedge.cli", "sim", "device", "--config",
                           str(bad)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith("cityedge: sim: config") and "Traceback" not in done.stderr
