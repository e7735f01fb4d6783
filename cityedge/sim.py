"""``cityedge sim device``: run the real device firmware on the MicroPython unix port.

The firmware is built as ``make firmware`` builds it (``cityedge.build_firmware``, into a
temporary directory) and booted as a board boots it: the board's ``main.py`` program
(``cityedge_fw.main.boot()``) on the unix port with a capped heap, code in the ROMFS image
mapped outside the heap (``cityedge.romfs``), the configuration in ``config.json`` on the
flash root. The unix board (``cityedge_fw/hal/unix.py``) takes from the environment what a
board has in hardware: the flash root (``CITYEDGE_FLASH``; with ``--config``, a directory
holding the configuration, and a LittleFS (``vfs.VfsLfs2``) image in a file on the host
mounted at ``/flash`` with the ring buffer and the state file, so stopping and starting
the simulator is a power cycle: the chain continues, buffered batches are sent).

The configuration file is the device's JSON configuration (see ``cityedge_fw.main``) plus:

``image``   ``{"path": "device.img", "blocks": 256, "block_size": 4096}`` the flash image
``sim``     ``{"heap": "96k"}``: the heap cap
``sensors`` as on a board; the unix HAL puts simulated parts on simulated buses
``clock``   ``"host"`` (default: NTP-like host time) or ``"none"`` (no trusted clock)

Relative paths in the file are relative to the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from cityedge import build_firmware
from cityedge_core.errors import LocalError

ROOT = Path(__file__).resolve().parent.parent
# The agent, HAL, driver and simulated part, code in ROMFS: 65.5 KiB in use after boot
# with one SHT3x; 78 KiB streams, 76 KiB connects but a signature finds no room
# (docs/ARCHITECTURE.md, "Memory on the device"); the default leaves room for more sensors
DEFAULT_HEAP = "96k"
DEFAULT_BLOCKS = 256  # 4 KiB blocks: a 1 MiB flash partition
DEFAULT_BLOCK_SIZE = 4096

sim_app = typer.Typer(help="Run simulated devices on the MicroPython unix port.",
                      no_args_is_help=True)

# The device's program: the board's own main.py (``cityedge.build_firmware.MAIN_PY``).
PROGRAM = "from cityedge_fw import main\nmain.boot()\n"


def build(out: Path) -> Path:
    """``make firmware`` into ``out``; returns its ROMFS image (code runs from it, as from a
    board's flash partition)."""
    firmware = out / "firmware"
    build_firmware.build(firmware)
    return out / "firmware.romfs"


def load_config(path: Path) -> dict[str, Any]:
    """Read the device configuration and make its paths absolute (flash under /flash)."""
    try:
        cfg: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LocalError("sim: cannot read config %s: %s" % (path, e)) from e
    base = path.resolve().parent
    for key in ("broker", "tls"):
        if not isinstance(cfg.get(key), dict):
            raise LocalError("sim: config %s has no %r section" % (path, key))
    for key in ("cert", "key", "ca"):
        if key not in cfg["tls"]:
            raise LocalError("sim: config %s: tls.%s (a DER file) is missing" % (path, key))
        cfg["tls"][key] = str(base / cfg["tls"][key])
    cfg["fleet_keys"] = [str(base / p) for p in cfg.get("fleet_keys", [])]
    image = cfg.setdefault("image", {})
    image["path"] = str(base / image.get("path", "device.img"))
    image.setdefault("blocks", DEFAULT_BLOCKS)
    image.setdefault("block_size", DEFAULT_BLOCK_SIZE)
    cfg["store"] = {"dir": "/flash/buffer", "state": "/flash/state.cbor"}
    return cfg


# What a provisioned simulated device samples when its configuration names no sensors.
DEFAULT_SENSORS = [
    {"type": "sht3x", "name": "air", "i2c": 0, "sda": 21, "scl": 22},
    {"type": "adc", "name": "noise", "pin": 34, "unit": "dB"},
]


def load_provisioned(root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The configuration a provisioned device wrote to its flash directory ``root``.

    Provisioning (``cityedge provision``) installs the certificate, CA, broker and store
    paths there; ``overrides`` (from ``--config``) may add sensors, agent or sim settings.
    """
    path = root / "config.json"
    try:
        cfg: dict[str, Any] = json.loads(path.read_text())
    except OSError as e:
        raise LocalError("sim: %s has no config.json: provision the device first "
                         "(cityedge provision --port ...)" % root) from e
    except ValueError as e:
        raise LocalError("sim: %s is not valid JSON: %s" % (path, e)) from e
    for key in ("sensors", "agent", "sim", "clock"):
        if key in overrides:
            cfg[key] = overrides[key]
    cfg.setdefault("sensors", DEFAULT_SENSORS)
    cfg.pop("image", None)
    return cfg


def ensure_image(image: dict[str, Any]) -> None:
    """Create the flash image erased (all 0xff) unless it exists with the right size."""
    path = Path(image["path"])
    size = int(image["blocks"]) * int(image["block_size"])
    if path.exists():
        if path.stat().st_size != size:
            raise LocalError("sim: flash image %s is %d bytes, config says %d; delete it "
                             "to start a fresh device" % (path, path.stat().st_size, size))
        return
    with path.open("wb") as f:
        block = b"\xff" * int(image["block_size"])
        for _ in range(int(image["blocks"])):
            f.write(block)


@sim_app.command("device")
def device(
    config: Annotated[Path | None, typer.Option(
        "--config", help="device configuration (JSON); with --root: overrides only")] = None,
    root: Annotated[Path | None, typer.Option(
        "--root", help="a device provisioned over serial: its flash directory")] = None,
    seconds: Annotated[float, typer.Option(
        help="stop after this many seconds (0: run until ^C)")] = 0,
) -> None:
    """Run one simulated device: real firmware, simulated sensors, flash in a file."""
    if root is not None:
        overrides = json.loads(config.read_text()) if config is not None else {}
        cfg = load_provisioned(root.resolve(), overrides)
    elif config is not None:
        cfg = load_config(config)
        ensure_image(cfg["image"])
    else:
        raise LocalError("sim: give --config FILE, or --root DIR of a provisioned device")
    heap = str(cfg.pop("sim", {}).get("heap", DEFAULT_HEAP))
    image = cfg.pop("image", None)
    with tempfile.TemporaryDirectory(prefix="cityedge-sim-") as tmp:
        romfs_image = build(Path(tmp))
        env = dict(os.environ, MICROPYPATH=".frozen", CITYEDGE_REPORT="1",
                   CITYEDGE_SECONDS=str(seconds or ""))
        # the flash root holds the configuration (with --root: the provisioned one and
        # the overrides; its paths name the device's files in its own directory)
        flash = Path(tmp) / "flash"
        flash.mkdir()
        (flash / "config.json").write_text(json.dumps(cfg))
        if image is not None:
            env["CITYEDGE_FLASH_IMAGE"] = "%s:%d:%d" % (image["path"], image["blocks"],
                                                        image["block_size"])
        env["CITYEDGE_FLASH"] = str(flash)
        cmd = [sys.executable, "-m", "cityedge.romfs", "--image", str(romfs_image),
               "-X", "heapsize=%s" % heap, "-c", PROGRAM]
        try:
            code = subprocess.run(cmd, env=env, check=False).returncode
        except KeyboardInterrupt:
            code = 0
    if code != 0:
        raise LocalError("sim: the device exited with status %d (see its output above)" % code)
