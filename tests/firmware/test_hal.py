"""Board support: the unix board on the real MicroPython unix port; esp32/rp2 compile only.

There is no ESP32 or Pico W here, so their board files are checked by ``mpy-cross`` (syntax,
names it can see) and by reading; what a person must verify on hardware is listed in the
ARCHITECTURE notes (Ethernet PHY pins, Wi-Fi fallback, watchdog timeout, NTP epoch).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
MICROPYTHON = ROOT / ".venv" / "bin" / "micropython"
sys.path.insert(0, str(FIRMWARE))

from cityedge.build_firmware import compile_tree  # noqa: E402
from cityedge_fw.hal import FaultySensor  # noqa: E402
from cityedge_fw.hal.mcu import mac_urn  # noqa: E402
from cityedge_host import mpy  # noqa: E402


@pytest.fixture(scope="module")
def mpy_tree(tmp_path_factory: pytest.TempPathFactory, mpy_cross: str) -> Path:
    """The firmware as .mpy: compiling source does not fit a 64 KiB heap next to the agent."""
    out = tmp_path_factory.mktemp("mpy")
    compile_tree(out)
    return out


BOARD_SCRIPT = """
import sys, json
sys.path.insert(0, %(firmware)r)
from cityedge_fw import hal, config
from cityedge_fw.sensors import SensorFault
cfg = config.validate(json.loads(%(config)r))
board = hal.board_class()(cfg)
out = {"name": board.name, "device": board.device_id(), "time": board.unix_time(),
       "heap": board.free_heap(), "ticks": board.ticks_ms(), "net": board.connect_network()}
board.wdt_feed()
readings = []
faults = []
for s in board.sensors(cfg):
    try:
        readings.extend(s.read())
    except SensorFault as e:
        faults.append([s.name, e.reason])
out["readings"] = readings
out["faults"] = faults
out["loaded"] = sorted(m for m in sys.modules if m.startswith("cityedge_fw.") and
                       m.split(".")[1] in ("agent", "mqtt", "mqtt_async", "store"))
out["board_modules"] = sorted(m for m in sys.modules if m.startswith("cityedge_fw.hal."))
out["sensor_modules"] = sorted(m for m in sys.modules if m.startswith("cityedge_fw.sensors"))
out["kept"] = sorted(board.config)
print(json.dumps(out))
"""


def _mp(script: str) -> dict:
    if not MICROPYTHON.exists():
        pytest.fail("micropython not found: run `make setup`")
    done = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=128k", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_unix_board_runs_real_drivers_on_simulated_parts(mpy_tree: Path) -> None:
    cfg = {
        "device": "urn:dev:mac:02000000beef",
        "broker": {"host": "127.0.0.1"},
        "tls": {"cert": "c", "key": "k", "ca": "a"},
        "sensors": [
            {"type": "sht3x", "name": "air", "sda": 21, "scl": 22},
            {"type": "scd4x", "name": "room", "sda": 21, "scl": 22},
            {"type": "ds18b20", "name": "water", "pin": 4},
            {"type": "adc", "name": "noise", "pin": 34, "unit": "dB", "scale": 100.0, "low": 60.0},
        ],
    }
    out = _mp(BOARD_SCRIPT % {"firmware": str(mpy_tree), "config": json.dumps(cfg)})
    assert out["name"] == "unix"
    assert out["device"] == "urn:dev:mac:02000000beef"
    assert out["time"] > 1_700_000_000 and out["net"] is True
    assert 0 < out["heap"] <= 128 * 1024
    names = [r[0] for r in out["readings"]]
    # the SCD4x has no value in its first 5 s: no readings, no fault
    assert names == ["air/temp", "air/humidity", "water/temp"]
    assert out["readings"][0][1:] == ["Cel", 21.5]
    assert out["readings"][2][1:] == ["Cel", 12.5]
    assert out["faults"] == [["noise", "adc noise: 50.001 dB out of range"]]
    # checking a configuration and making a board needs nothing of the agent (issue 13)
    assert out["loaded"] == [], out["loaded"]
    # nor the machine-only base or the unix board's UART and flash image; and the board
    # keeps the keys it reads after boot, not the whole file (issue 13, the board's heap)
    # the parts other than the SHT3x come through ``unix_parts``, loaded for them only
    assert out["board_modules"] == ["cityedge_fw.hal.unix", "cityedge_fw.hal.unix_parts"], \
        out["board_modules"]
    assert out["kept"] == ["device"], out["kept"]


def test_unix_board_without_a_device_id_says_so(mpy_tree: Path) -> None:
    script = (
        "import sys\nsys.path.insert(0, %r)\nfrom cityedge_fw import hal\n"
        "import json\ntry:\n    hal.board_class()({}).device_id()\nexcept ValueError as e:\n"
        "    print(json.dumps({'error': str(e)}))\n" % str(mpy_tree)
    )
    assert "must name the" in _mp(script)["error"]


def test_mac_urn_and_faulty_sensor() -> None:
    assert mac_urn(bytes.fromhex("0024befffe80")) == "urn:dev:mac:0024befffe80"
    with pytest.raises(ValueError):
        mac_urn(b"\x00" * 8)
    from cityedge_fw.sensors import SensorFault

    with pytest.raises(SensorFault, match="bus setup failed"):
        FaultySensor("x", "bus setup failed: pin 99").read()


@pytest.mark.parametrize("board", ["esp32", "rp2", "unix"])
def test_board_files_compile_with_mpy_cross(board: str, tmp_path: Path, mpy_cross: str
                                            ) -> None:
    src = FIRMWARE / "cityedge_fw" / "hal" / (board + ".py")
    out = mpy.compile_file(src, tmp_path / (board + ".mpy"))
    assert out.read_bytes()[:1] == b"M"  # .mpy header


def test_a_board_loads_the_driver_modules_of_its_configured_sensor_types_only(
        mpy_tree: Path) -> None:
    """One SHT3x: its driver and simulated part, nothing of the other types (each module
    loaded interns its names for good: docs/ARCHITECTURE.md, "Memory on the device")."""
    cfg = {"device": "urn:dev:mac:02000000beef", "broker": {"host": "127.0.0.1"},
           "tls": {"cert": "c", "key": "k", "ca": "a"},
           "sensors": [{"type": "sht3x", "name": "air", "sda": 21, "scl": 22}]}
    out = _mp(BOARD_SCRIPT % {"firmware": str(mpy_tree), "config": json.dumps(cfg)})
    assert [r[0] for r in out["readings"]] == ["air/temp", "air/humidity"]
    assert out["board_modules"] == ["cityedge_fw.hal.unix"], out["board_modules"]
    assert out["sensor_modules"] == ["cityedge_fw.sensors", "cityedge_fw.sensors.sht3x",
                                     "cityedge_fw.sensors.sim"], out["sensor_modules"]
