"""The firmware-image probe: read a firmware bundle and its release files, then decide
(``image_rules``).

``capture(bundle)`` walks the bundle once with ``secret_bundle.Bundle`` (a directory, a
tar or zip, a ROMFS image or one file; its size and count limits): each file is scanned for
secrets (``secret_scan.scan_item``), hashed, kept if it is a ``boot.py``, and listed
(``image_rules.romfs_files``) if it is a ROMFS image. Nothing else is kept in memory.
``load_release`` reads the signed manifest, the release-key list and the root set(s);
``probe_image`` is the one call the ``hw check`` orchestrator makes.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cityedge_hardware.image_rules import (
    ROMFS_HEADER,
    BundleFile,
    ImageCapture,
    ReleaseInputs,
    RomfsError,
    check_image,
    romfs_files,
)
from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.secret_bundle import Bundle
from cityedge_hardware.secret_scan import ScanResult, scan_item
from cityedge_hardware.verdict import Verdict
from cityedge_host.errors import UserError
from cityedge_host.release import RootSet

Progress = Callable[[str], None] | None


class ReleaseFileError(UserError):
    hint = ("pass the files `cityedge release sign` (manifest.cose) and `cityedge release "
            "certify` (release-keys.cose) wrote, and the root-set.json the city gave you")


def capture(bundle: Path, limits: HardwareLimits = LIMITS) -> ImageCapture:
    """Read ``bundle`` once into an ``ImageCapture`` (``BundleError``: unreadable)."""
    reader = Bundle(bundle)
    scan = ScanResult()
    files: list[BundleFile] = []
    boots: list[tuple[str, bytes]] = []
    romfs: dict[str, dict[str, bytes] | str] = {}
    for name, data in reader.items():
        scan_item(name, data, scan)
        files.append(BundleFile(name, len(data), hashlib.sha256(data).digest()))
        if posixpath.basename(name.split("!")[-1]) == "boot.py":
            boots.append((name, data))
        if data.startswith(ROMFS_HEADER):
            try:
                romfs[name] = {p: hashlib.sha256(b).digest()
                               for p, b in romfs_files(data, limits).items()}
            except RomfsError as e:
                romfs[name] = str(e)
    scan.incomplete.extend(reader.skipped)
    return ImageCapture(str(bundle), tuple(files), tuple(boots), romfs, scan)


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(LIMITS.release_file_max_bytes + 1)
    except OSError as e:
        raise ReleaseFileError("cannot read the %s %s: %s" % (what, path, e.strerror or e)
                               ) from e
    if len(data) > LIMITS.release_file_max_bytes:
        raise ReleaseFileError("the %s %s is larger than %d bytes" % (
            what, path, LIMITS.release_file_max_bytes))
    return data


def load_release(manifest: Path | None, key_list: Path | None, roots: Sequence[Path],
                 min_sequence: int = 0, hw_class: str | None = None,
                 now: int | None = None) -> ReleaseInputs | None:
    """The release inputs, or None when no manifest is given (the rules then say what to
    supply). A manifest without its key list or a root set is a usage error."""
    if manifest is None:
        return None
    if key_list is None or not roots:
        raise UserError("a manifest is checked against its release-key list and a root set",
                        hint="give --release-keys release-keys.cose and --release-root "
                        "root-set.json with --release")
    if min_sequence < 0:
        raise UserError("--min-sequence must be 0 or more")
    root_sets = []
    for p in roots:
        _read(p, "root set")  # the size limit first
        root_sets.append((str(p), RootSet.load(p)))
    return ReleaseInputs(_read(manifest, "manifest"), _read(key_list, "release-key list"),
                         tuple(root_sets), int(time.time()) if now is None else now,
                         min_sequence, hw_class)


def probe_image(bundle: Path, *, manifest: Path | None = None,
                release_keys: Path | None = None, release_roots: Sequence[Path] = (),
                min_sequence: int = 0, platform: str = "esp32", hw_class: str | None = None,
                now: int | None = None, progress: Progress = None) -> list[Verdict]:
    """Every image verdict for ``bundle`` (CE-UPD-03, CE-UPD-04, CE-AUTH-06, CE-DBG-03)."""
    release = load_release(manifest, release_keys, release_roots, min_sequence, hw_class,
                           now)
    if progress is not None:
        progress("image: reading %s" % bundle)
    cap = capture(bundle)
    if progress is not None:
        progress("image: %d files, %d bytes read; checking the release and boot.py"
                 % (cap.scan.files, cap.scan.bytes))
    return check_image(cap, release, platform)
