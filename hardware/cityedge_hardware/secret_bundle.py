"""Reading a firmware bundle for the secret scanner: a directory, a tar, a zip or one raw file.

``read_bundle(path)`` yields ``(name, bytes)`` pairs for ``secret_scan.scan_items`` and
records in ``skipped`` what it did not read (too large, too many files, a link). A ROMFS
image (``make firmware`` writes ``build/firmware.romfs``) is read as one raw file: ROMFS keeps
file contents unchanged and uncompressed, so every file in it is seen by the raw scan. Every
size and count comes from ``LIMITS``; an archive member's size is checked before it is
decompressed. A tar or zip inside the bundle is opened too (one level deep: its members are
named ``outer!member``), so a compressed file cannot hide a key from the raw scan.
"""

from __future__ import annotations

import io
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

    def _nested(self, name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
        """The file itself, then, if it is a tar or zip, its members (one level deep)."""
        yield name, data
        buf = io.BytesIO(data)
        try:
            if zipfile.is_zipfile(buf):
                with zipfile.ZipFile(buf) as zf:
                    yield from self._zip_members(zf, name + "!")
            elif data[257:262] == b"ustar" or data[:2] == b"\x1f\x8b":
                with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                    yield from self._tar_members(tf, name + "!")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            if data[:2] != b"\x1f\x8b":  # a gzip that is not a tar is only scanned raw
                self.skipped.append("%s: an archive that cannot be read (%s)" % (name, e))

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
                    yield from self._nested(name, f.read_bytes())

    def _tar(self, p: Path) -> Iterator[tuple[str, bytes]]:
        with tarfile.open(p) as tf:
            yield from self._tar_members(tf, "")

    def _zip(self, p: Path) -> Iterator[tuple[str, bytes]]:
        with zipfile.ZipFile(p) as zf:
            yield from self._zip_members(zf, "")

    def _tar_members(self, tf: tarfile.TarFile, outer: str) -> Iterator[tuple[str, bytes]]:
        for m in tf:
            if not m.isfile():
                continue
            if self._admit(outer + m.name, m.size):
                fo = tf.extractfile(m)
                if fo is not None:
                    data = fo.read(m.size)
                    yield from (self._nested(m.name, data) if not outer
                                else iter([(outer + m.name, data)]))

    def _zip_members(self, zf: zipfile.ZipFile, outer: str) -> Iterator[tuple[str, bytes]]:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if self._admit(outer + info.filename, info.file_size):
                with zf.open(info) as fo:  # reads no more than file_size declares
                    data = fo.read(LIMITS.secret_file_max_bytes + 1)
                yield from (self._nested(info.filename, data) if not outer
                            else iter([(outer + info.filename, data)]))
