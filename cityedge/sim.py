"""``cityedge sim device``: run the real device firmware on the MicroPython unix port.

The firmware (``firmware/cityedge_core`` + ``firmware/cityedge_fw``) is compiled with
``mpy-cross`` into a cache directory and started on ``.venv/bin/micropython`` with a capped
heap. Its flash is a LittleFS (``vfs.VfsLfs2``) image in a file on the host, mounted at
``/flash``: the ring buffer and the state file live there, so stopping and starting the
simulator is a power cycle (the chain continues, buffered batches are sent).

The configuration file is the device's JSON configuration (see ``cityedge_fw.main``) plus:

``image``   ``{"path": "device.img", "blocks": 256, "block_size": 4096}`` the flash image
``sim``     ``{"heap": "192k"}``: the heap cap
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

from cityedge_core.errors import LocalError

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
BIN = Path(sys.executable).parent
DEFAULT_HEAP = "192k"  # the agent (~70 KiB of .mpy on the heap), HAL, drivers, simulated parts
DEFAULT_BLOCKS = 256  # 4 KiB blocks: a 1 MiB flash partition
DEFAULT_BLOCK_SIZE = 4096

sim_app = typer.Typer(help="Run simulated devices on the MicroPython unix port.",
                      no_args_is_help=True)

# The MicroPython side: a file-backed block device for LittleFS, then the firmware's boot.
RUNNER = r'''
import gc, json, os, sys, time
import asyncio, vfs


class FileFlash:
    """A LittleFS block device over a host file (the simulated flash chip)."""

    def __init__(self, path, blocks, block_size):
        self.bs = block_size
        self.blocks = blocks
        self.f = open(path, "r+b")  # created erased (0xff) by the host side

    def readblocks(self, block, buf, offset=0):
        self.f.seek(block * self.bs + offset)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, offset=0):
        self.f.seek(block * self.bs + offset)
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.bs
        if op == 6:
            return 0
        return None


def board_for(cfg):
    from cityedge_fw import config, hal

    cfg = config.validate(cfg)
    return cfg, hal.get_board(cfg)  # build() unloads config when it is done


async def report(agent):
    last = None
    while True:
        gc.collect()
        now = (agent.writer.seq, agent.store.count, agent.published, agent.link.connects)
        if now != last:
            print("sim: seq=%d buffered=%d published=%d connects=%d heap_free=%d %s" % (
                now + (gc.mem_free(), agent.last_error or agent.link.last_error or "")))
            last = now
        await asyncio.sleep_ms(1000)


async def run(agent, seconds):
    task = asyncio.create_task(agent.run())
    rep = asyncio.create_task(report(agent))
    if seconds:
        await asyncio.sleep_ms(int(seconds * 1000))
    else:
        await task
    task.cancel()
    rep.cancel()
    await asyncio.sleep_ms(10)


def main():
    with open(os.getenv("CE_SIM_CONFIG")) as f:
        cfg = json.load(f)
    image = cfg.get("image")
    if image:  # flash in a LittleFS image; otherwise a provisioned device's directory
        flash = FileFlash(image["path"], image["blocks"], image["block_size"])
        try:
            vfs.mount(vfs.VfsLfs2(flash), "/flash")
        except OSError:
            vfs.VfsLfs2.mkfs(flash)
            vfs.mount(vfs.VfsLfs2(flash), "/flash")
    import cityedge_fw
    from cityedge_fw import main as fw_main

    cfg, board = board_for(cfg)
    agent = fw_main.build(cfg, board)
    print("sim: %s boot %d on %s, chain at seq %d, %d batches buffered" % (
        agent.device, agent.boot, board.name, agent.writer.seq, agent.store.count))
    del fw_main
    cityedge_fw.unload("cityedge_fw.main")  # boot-only code off the heap, as on a board
    gc.collect()
    asyncio.run(run(agent, float(os.getenv("CE_SIM_SECONDS") or 0)))
    if image:
        vfs.umount("/flash")


main()
'''


def compile_firmware(out: Path) -> Path:
    """Compile the core and the agent to .mpy under ``out`` (the board's file layout)."""
    mpy_cross = BIN / "mpy-cross"
    if not mpy_cross.exists():
        raise LocalError("sim: %s not found; run `make setup`" % mpy_cross)
    for package in ("cityedge_core", "cityedge_fw"):
        for src in sorted((FIRMWARE / package).rglob("*.py")):
            rel = src.relative_to(FIRMWARE).with_suffix(".mpy")
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run([str(mpy_cross), "-o", str(dest), "-s",
                                   str(rel.with_suffix(".py")), str(src)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise LocalError("sim: mpy-cross failed on %s: %s" % (src, done.stderr))
    runner = out / "sim_runner.py"
    runner.write_text(RUNNER)
    subprocess.run([str(mpy_cross), "-o", str(out / "sim_runner.mpy"), str(runner)],
                   capture_output=True, check=True)
    runner.unlink()
    return out


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
    micropython = BIN / "micropython"
    if not micropython.exists():
        raise LocalError("sim: %s not found; run `make setup`" % micropython)
    heap = str(cfg.get("sim", {}).get("heap", DEFAULT_HEAP))
    with tempfile.TemporaryDirectory(prefix="cityedge-sim-") as tmp:
        mpy = compile_firmware(Path(tmp) / "mpy")
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        env = dict(os.environ, MICROPYPATH="%s:.frozen" % mpy, CE_SIM_CONFIG=str(cfg_path),
                   CE_SIM_SECONDS=str(seconds or ""))
        cmd = [str(micropython), "-X", "heapsize=%s" % heap, "-c", "import sim_runner"]
        try:
            code = subprocess.run(cmd, env=env, check=False).returncode
        except KeyboardInterrupt:
            code = 0
    if code != 0:
        raise LocalError("sim: the device exited with status %d (see its output above)" % code)
