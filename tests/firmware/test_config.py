"""The device configuration file: defaults filled in, every mistake a ConfigError naming the key."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from cityedge_fw import config
from cityedge_fw.config import ConfigError

GOOD = {
    "device": "urn:dev:mac:0024befffe80",
    "broker": {"host": "mqtt.city.example"},
    "tls": {"cert": "/cert.der", "key": "/key.der", "ca": "/ca.der"},
    "agent": {"sample_interval_s": 5, "batch_readings": 20},
    "sensors": [
        {"type": "sht3x", "name": "air", "sda": 21, "scl": 22},
        {"type": "ds18b20", "name": "water", "pin": 4, "rom": "28ff641e0f0c0019"},
        {"type": "adc", "name": "noise", "pin": 34, "unit": "dB", "scale": 100.0},
    ],
}


def _cfg(**changes: object) -> dict:
    cfg = json.loads(json.dumps(GOOD))
    cfg.update(changes)
    return cfg


def test_good_config_gets_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GOOD))
    cfg = config.load(str(path))
    assert cfg["broker"]["port"] == 8883
    assert cfg["store"] == {"dir": "/buffer", "state": "/state.cbor"}
    assert cfg["topic_prefix"] == "ce/v1"
    assert cfg["agent"]["sample_interval_s"] == 5
    assert cfg["agent"]["batch_seconds"] > 0  # agent default filled in
    assert cfg["sensors"][0]["address"] == 0x44 and cfg["sensors"][0]["freq"] == 100000


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (_cfg(broker=None), "broker: section is required"),
        (_cfg(broker={"host": "h", "port": 70000}), "port=70000 must be an integer in 1..65535"),
        (_cfg(device="mac:00"), "device"),
        (_cfg(tls={"cert": "/c"}), "tls: key is required"),
        (_cfg(agent={"sample_interval_s": 0}), "agent: setting sample_interval_s=0"),
        (_cfg(agent={"buffer_budget_bytes": "lots"}), "buffer_budget_bytes"),
        (_cfg(sensors=[{"type": "bme999", "name": "x"}]), "type='bme999' is not one of"),
        (_cfg(sensors=[{"type": "sht3x", "name": "Air!", "sda": 1, "scl": 2}]), "name 'Air!'"),
        (_cfg(sensors=[{"type": "sht3x", "name": "a", "sda": 1}]), "scl is required"),
        (_cfg(sensors=[{"type": "ds18b20", "name": "w", "pin": 4, "rom": "xyz"}]), "rom must"),
        (_cfg(sensors=[{"type": "adc", "name": "n", "pin": 4}]), "unit is required"),
        (_cfg(sensors=[GOOD["sensors"][0], GOOD["sensors"][0]]), "used twice"),
        (_cfg(topic_prefix="ce/#"), "'ce/v1' .*the fleet serves no other prefix"),
        # a prefix the fleet's broker rules and ingest do not serve would lose every batch
        # (the broker acknowledges a refused publish and drops it): refused at boot
        (_cfg(topic_prefix="lab/v1"), "'ce/v1' .*the fleet serves no other prefix"),
        ([], "must be a JSON object"),
    ],
)
def test_mistakes_name_the_key(cfg: object, message: str) -> None:
    with pytest.raises(ConfigError, match="config: .*" + message.replace("(", r"\(")):
        config.validate(cfg)


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.load(str(bad))
    big = tmp_path / "big.json"
    big.write_text(" " * (config._CONFIG_MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.load(str(big))
