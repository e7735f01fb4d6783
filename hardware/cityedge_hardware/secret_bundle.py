"""Reading a firmware bundle for the secret scanner: a directory, a tar, a zip or one raw file.

``read_bundle(path)`` yields ``(name, bytes)`` pairs for ``secret_scan.scan_items`` and
records in ``skipped`` what it did not read (too large, too many files, a link). A ROMFS
image (``make firmware`` writes ``build/firmware.romfs``) is read as one raw file: ROMFS keeps
file contents unchanged and uncompressed, so every file in it is seen by the raw scan. Every
size and count comes from ``LIMITS``; an archive member's size is checked before it is
decompressed.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cityedge_hardware.limits import LIMITS
from cityedge_host.errors import UserError


class BundleError(UserError):
    hint = ("pass a directory, a .tar/.tar.gz/.zip, a ROMFS image or one file the firmware "
            "build wrote")


@dataclass
class Bundle:
    """A bundle being read: what was skipped, and how many bytes were read so far."""

    path: Path
    skipped: list[str] = field(default_factory=list)  # "name: why"
    read_bytes: int = 0
    files: int = 0

    def _admit(self, name: str, size: int) -> bool:
        if self.files >= LIMITS.secret_max_files:
            if not self.skipped or not self.skipped[-1].startswith("*"):
                self.skipped.append("*: more than %d files, the rest not read"
                                    % LIMITS.secret_max_files)
            return False
        if size > LIMITS.secret_file_max_bytes:
            self.skipped.append("%s: %d bytes, over %d" % (name, size,
                                                           LIMITS.secret_file_max_bytes))
            return False
        if self.read_bytes + size > LIMITS.secret_total_max_bytes:
            self.skipped.append("%s: the scan's %d bytes are used up"
                                % (name, LIMITS.secret_total_max_bytes))
            return False
        self.files += 1
        self.read_bytes += size
        return True

    def items(self) -> Iterator[tuple[str, bytes]]:
        p = self.path
        try:
            if p.is_dir():
                yield from self._directory(p)
            elif tarfile.is_tarfile(p):
                yield from self._tar(p)
            elif zipfile.is_zipfile(p):
                yield from self._zip(p)
            elif p.is_file():
                if self._admit(p.name, p.stat().st_size):
                    yield p.name, p.read_bytes()
            else:
                raise BundleError("%s is neither a file nor a directory" % p)
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise BundleError("cannot read %s: %s" % (p, e)) from e

    def _directory(self, root: Path) -> Iterator[tuple[str, bytes]]:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                f = Path(dirpath) / fn
                name = f.relative_to(root).as_posix()
                if f.is_symlink() or not f.is_file():
                    self.skipped.append("%s: not a regular file" % name)
                    continue
                if self._admit(name, f.stat().st_size):
                    yield name, f.read_bytes()

    def _tar(self, p: Path) -> Iterator[tuple[str, bytes]]:
        with tarfile.open(p) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if self._admit(m.name, m.size):
                    fo = tf.extractfile(m)
                    if fo is not None:
                        yield m.name, fo.read(m.size)

    def _zip(self, p: Path) -> Iterator[tuple[str, bytes]]:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if self._admit(info.filename, info.file_size):
                    with zf.open(info) as fo:  # reads no more than file_size declares
                        yield info.filename, fo.read(LIMITS.secret_file_max_bytes + 1)
