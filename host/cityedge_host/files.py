"""Writing a file so that a crash leaves the old one or the new one, never half of either.

``write_atomic(path, data, mode)``: the data goes to a temporary file beside the target
(same directory, so the rename cannot cross file systems), is flushed and fsynced, gets
its mode, replaces the target by ``os.replace`` (atomic on POSIX), and the directory is
fsynced so the rename itself survives a power cut. On any failure the temporary file is
removed and the target is untouched. The one place the CPython parts write a key, a
certificate, a CRL, a login or a broker state. (The device has its own:
``cityedge_fw.files.write_atomic``.)

``atomic_writer(path, mode)`` is the same steps for data that arrives in pieces (an
artifact uploaded to the fleet, never held whole in memory): a context manager giving the
open temporary file; the target is replaced only when the block ends without an
exception, and the block may ``abandon()`` it (a digest that did not match).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably."""
    with atomic_writer(path, mode) as f:
        f.write(data)


class AtomicFile:
    """The temporary file of ``atomic_writer``: ``write``, and ``abandon`` to keep the
    target as it was."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.abandoned = False

    def write(self, data: bytes) -> int:
        return self._f.write(data)

    def abandon(self) -> None:
        self.abandoned = True


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o600, *,
                  tmp_suffix: str = ".tmp") -> Iterator[AtomicFile]:
    """``path`` replaced by what the block writes, atomically and durably (the module's
    docstring); ``tmp_suffix`` names the temporary file (distinct per writer when several
    may write the same target at once)."""
    tmp = path.with_name(path.name + tmp_suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            out = AtomicFile(f)
            yield out
            f.flush()
            os.fsync(f.fileno())
        if out.abandoned:
            tmp.unlink(missing_ok=True)
            return
        os.chmod(tmp, mode)  # os.open's mode is masked by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
