"""The device's one atomic file write: the ring buffer, its state files and provisioning use it.

``write_atomic(path, data)`` writes ``data`` (bytes-like, or a tuple of bytes-like parts
written one after the other, never joined) to ``path + ".tmp"``, flushes it, pushes it to
stable storage where the interpreter can (``os.fsync`` on CPython; ``os.sync`` on the
MicroPython ports that have one, ESP32 and RP2, which flushes the block device's cache),
then renames it over ``path``: LittleFS and POSIX renames are atomic, so after a power cut
the file holds the old or the new bytes, never a mix. On failure the temporary file is
removed and the ``OSError`` raised; callers say what the file was (``StorageError``).

Measured heap (MicroPython 1.29 unix port, .mpy): importing this module costs about
0.4 KB; a write allocates the temporary file's name and the file object (about 0.1 KB).
"""

import os

_TMP = ".tmp"


def _sync_file(f):
    """Flush ``f`` and, on CPython, ``fsync`` it (before it is closed)."""
    f.flush()
    sync = getattr(os, "fsync", None)
    if sync is not None:
        sync(f.fileno())


def _sync_device():
    """MicroPython on a board (no ``fsync``): ``os.sync`` flushes the block device's
    cache once LittleFS has committed the closed file. CPython's ``os.sync`` would flush
    every file system: never called there (``fsync`` did the job)."""
    if not hasattr(os, "fsync"):
        sync = getattr(os, "sync", None)
        if sync is not None:
            sync()


def _sync_dir(path):
    """Make a rename durable (POSIX: fsync the directory); a no-op on MicroPython,
    where LittleFS commits the rename with the directory block itself."""
    sync = getattr(os, "fsync", None)
    if sync is None or not hasattr(os, "O_RDONLY"):
        return
    d = path.rsplit("/", 1)[0] if "/" in path else ""
    fd = os.open(d or ".", os.O_RDONLY)  # type: ignore[attr-defined]
    try:
        sync(fd)
    finally:
        os.close(fd)  # type: ignore[attr-defined]


def write_atomic(path, data):
    """Replace ``path`` with ``data`` (bytes-like or a tuple of parts); OSError on failure,
    with nothing left behind but the old file."""
    tmp = path + _TMP
    parts = data if isinstance(data, tuple) else (data,)
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            _sync_file(f)
        _sync_device()
        os.rename(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _sync_dir(path)
