"""Who has the gateway's buffer: one process at a time.

A running ``cityedge gateway run`` holds an exclusive ``flock`` on ``<buffer>.lock`` (beside
the SQLite buffer, in the gateway's state folder) for as long as its ``Store`` is open;
``cityedge gateway install-trust`` takes the same lock before it opens the buffer. So a
technician cannot install a statement under a running gateway (which holds the statement
it read at start in memory, and would answer and write the buffer as if nothing had
changed), and a second gateway cannot start on a buffer another one runs on (two writers
of one chain). SQLite's own locks do not tell: in WAL mode a reader and a writer share the
file freely, and a running gateway holds no transaction between commits.

The kernel drops a ``flock`` when its file is closed, which it does for a process that
ends however it ends (``kill -9``, a power cut): there is never a stale lock to remove.
The file holds the holder's pid, for the message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cityedge_host.errors import UserError

LOCK_SUFFIX = ".lock"
_PID_MAX_BYTES = 32  # read back from the lock file for the message


class BufferBusy(UserError):
    """Another process (a running gateway) holds the buffer."""

    hint = ("stop the gateway service first (sudo systemctl stop cityedge-gateway), then "
            "run this again and start the service afterwards")


def lock_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + LOCK_SUFFIX)


class BufferLock:
    """The buffer's lock, held from ``__init__`` until ``release``; raises ``BufferBusy``
    if another open file holds it (another process, or another ``Store`` here)."""

    def __init__(self, store_path: Path) -> None:
        self.path = lock_path(store_path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise UserError("cannot open the buffer's lock %s: %s" % (self.path, e.strerror),
                            hint="the buffer's folder must exist and be writable by this "
                            "user (the gateway's, or root)") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, _PID_MAX_BYTES, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise BufferBusy("the buffer %s is in use by a running gateway (process %s)"
                             % (store_path, holder or "?")) from None
        except OSError as e:
            os.close(fd)
            raise UserError("cannot lock the buffer's lock %s: %s"
                            % (self.path, e.strerror)) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (closing the file drops it); again: nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
