"""``make firmware``: build the device firmware from its package manifests.

Each firmware package has a ``manifest.py`` in micropython-lib's format
(``firmware/cityedge_core/manifest.py``, ``firmware/cityedge_fw/manifest.py``:
``metadata(version=...)``, ``package(...)``, ``include(...)``); the build reads them
(``read_manifest``), checks each version against the package's ``VERSION`` (one version
string: ``cityedge_fw.VERSION`` is the firmware's), and writes to ``build/firmware/``:

- ``cityedge_core/*.mpy``, ``cityedge_fw/**/*.mpy``: every module of the packages compiled
  with ``mpy-cross`` (``cityedge_host.mpy``; package directories kept), ready to copy onto
  a board's file system or to put on ``sys.path`` of the unix port;
- ``manifest.py``: a MicroPython freeze manifest for a custom ESP32 or RP2 image, built with
  ``make BOARD=... FROZEN_MANIFEST=.../manifest.py``; it lists the packages' files but the
  unix-only ones (simulated sensors, unix board);
- ``../firmware.romfs``: a ROMFS image of the .mpy tree for boards running MicroPython
  1.25+ with a ROMFS partition (``mpremote romfs deploy build/firmware.romfs``): bytecode
  runs in place from flash instead of the heap; ``cityedge.romfs`` maps the same image for
  the unix port;
- ``boot.py``: the production boot file, which detaches the REPL from the UART so the serial
  line carries only framed provisioning messages; ``main.py`` boots the device
  (``cityedge_fw.main.boot()``: provisioning mode on the board's UART while not locked,
  then the agent);
- ``VERSION``: the firmware version, one line.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cityedge import romfs
from cityedge_host.errors import UserError
from cityedge_host.mpy import compile_file, package_sources
from cityedge_host.production_boot import BOOT_PY

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
PACKAGES = ("cityedge_core", "cityedge_fw")  # each with its manifest.py
# modules that exist only for the unix port: not frozen into board images
UNIX_ONLY = ("cityedge_fw/hal/unix.py", "cityedge_fw/hal/unix_io.py",
             "cityedge_fw/hal/unix_parts.py", "cityedge_fw/sensors/sim.py",
             "cityedge_fw/sensors/sim_adc.py", "cityedge_fw/sensors/sim_onewire.py",
             "cityedge_fw/sensors/sim_scd4x.py")

MAIN_PY = '''"""Boot the cityedge device (written by ``make firmware``): provisioning mode on the
board's UART while the device is not locked, then the agent."""

from cityedge_fw import main

main.boot()
'''


class BuildError(UserError):
    """The firmware could not be built (a manifest is wrong; ``mpy-cross`` failures are
    ``cityedge_host.mpy.CompileError``)."""


@dataclass
class Manifest:
    """What one package's ``manifest.py`` declares (the subset of micropython-lib's
    manifest functions the firmware uses)."""

    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    packages: list[tuple[str, Path]] = field(default_factory=list)  # (name, base directory)
    includes: list[Path] = field(default_factory=list)


def read_manifest(path: Path) -> Manifest:
    """Evaluate a package manifest: ``metadata(...)``, ``package(name, base_path=...)``,
    ``include(dir)``; any other call is refused (this build does not implement it)."""
    m = Manifest(path)
    here = path.parent

    def metadata(**kw: str) -> None:
        m.metadata.update(kw)

    def package(name: str, files: object = None, base_path: str = ".",
                opt: object = None) -> None:
        if files is not None:
            raise BuildError("%s: package(files=...) is not supported here" % path)
        m.packages.append((name, (here / base_path).resolve()))

    def include(target: str) -> None:
        m.includes.append((here / target).resolve())

    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError) as e:
        raise BuildError("cannot read manifest %s: %s" % (path, e)) from e
    calls: dict[str, Callable[..., None]] = {"metadata": metadata, "package": package,
                                             "include": include}
    for node in tree.body:  # only calls of the names above, with constant arguments
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id in calls):
            raise BuildError("%s line %d: only metadata(), package() and include() calls"
                             % (path, node.lineno))
        call = node.value
        name = node.value.func.id
        try:
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
        except ValueError as e:
            raise BuildError("%s line %d: arguments must be constants" % (path, node.lineno)
                             ) from e
        calls[name](*args, **kwargs)
    return m


def package_version(package: str) -> str:
    """``VERSION`` of a firmware package, read from its ``__init__.py`` without importing it."""
    init = FIRMWARE / package / "__init__.py"
    for node in ast.parse(init.read_text(), str(init)).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "VERSION"):
            version = ast.literal_eval(node.value)
            if isinstance(version, str):
                return version
    raise BuildError("%s has no VERSION string" % init)


def manifests(packages: tuple[str, ...] = PACKAGES) -> list[Manifest]:
    """Each package's manifest, checked: it declares its own package, with the version of
    the package's ``VERSION``."""
    out = []
    for package in packages:
        m = read_manifest(FIRMWARE / package / "manifest.py")
        if [name for name, _ in m.packages] != [package]:
            raise BuildError("%s must declare package(%r) only" % (m.path, package))
        version = package_version(package)
        if m.metadata.get("version") != version:
            raise BuildError("%s: version %r, but %s.VERSION is %r: change both together"
                             % (m.path, m.metadata.get("version"), package, version))
        out.append(m)
    return out


def sources(packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Every module of the packages the manifests declare, relative to ``firmware/``."""
    out: list[Path] = []
    for m in manifests(packages):
        for name, base in m.packages:
            out.extend((base / p).relative_to(FIRMWARE) for p in package_sources(base / name))
    return sorted(out)


def module_name(rel: Path) -> str:
    """The dotted name of the module at ``rel`` (``cityedge_fw/hal/unix.py`` ->
    ``cityedge_fw.hal.unix``, a package's ``__init__.py`` -> the package)."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def compile_tree(out: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Compile every module into ``out/<package>/...mpy``; returns the .mpy paths written.

    The file name a module's tracebacks show is its dotted name (``module_name``), which
    the import interns anyway: a path would be one more interned name per module, for
    good on a device's heap (``docs/ARCHITECTURE.md``, "Memory on the device")."""
    return [compile_file(FIRMWARE / rel, out / rel.with_suffix(".mpy"), module_name(rel))
            for rel in sources(packages)]


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
    for m in manifests(packages):
        for package, _base in m.packages:
            files = [
                rel.relative_to(package).as_posix()
                for rel in sources((package,))
                if rel.as_posix() not in UNIX_ONLY
            ]
            lines.append("# %s %s (%s)" % (package, m.metadata["version"],
                                            m.path.relative_to(ROOT).as_posix()))
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
    (out / "VERSION").write_text(package_version("cityedge_fw") + "\n")
    romfs.write_image(out, out.parent / (out.name + ".romfs"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "firmware")
    args = parser.parse_args(argv)
    try:
        written = build(args.out)
    except (UserError, OSError, ValueError) as e:
        print("cityedge: %s" % e, file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in written)
    print("cityedge: firmware %s: %d modules, %d bytes of .mpy in %s"
          % (package_version("cityedge_fw"), len(written), size, args.out))
    image = args.out.parent / (args.out.name + ".romfs")
    print("cityedge: ROMFS image %s (%d bytes)" % (image, image.stat().st_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
