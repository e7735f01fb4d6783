"""Writing a file so that a crash leaves the old one or the new one, never half of either.

``write_atomic(path, data, mode)``: the data goes to a temporary file beside the target
(same directory, so the rename cannot cross file systems), is flushed and fsynced, gets
its mode, replaces the target by ``os.replace`` (atomic on POSIX), and the directory is
fsynced so the rename itself survives a power cut. On any failure the temporary file is
removed and the target is untouched. The one place the CPython parts write a key, a
certificate, a CRL, a login or a broker state. (The device has its own:
``cityedge_fw.files.write_atomic``.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
