"""The device's one atomic file write: the ring buffer, its state files and provisioning use it.

``write_atomic(path, data)`` writes ``data`` (bytes-like, or a tuple of bytes-like parts
written one after the other, never joined) to ``path + ".tmp"``, flushes it, pushes it to
stable storage where the interpreter can (``os.fsync`` on CPython; ``os.sync`` on the
MicroPython ports that have one, ESP32 and RP2, which flushes the block device's cache),
then renames it over ``path``: LittleFS and POSIX renames are atomic, so after a power cut
the file holds the old or the new bytes, never a mix. On failure the temporary file is
removed and the ``OSError`` raised; callers say what the file was (``StorageError``).

Measured heap (MicroPython 1.29 unix port, 64-bit, .mpy, ``gc.mem_alloc`` around the
import): importing this module costs 0.6 KB.
"""

import os


def write_atomic(path, data):
    """Replace ``path`` with ``data`` (bytes-like or a tuple of parts); OSError on failure,
    with nothing left behind but the old file. One function, no helpers: each costs a
    device heap."""
    tmp = path + ".tmp"
    fsync = getattr(os, "fsync", None)  # CPython; MicroPython has none
    try:
        with open(tmp, "wb") as f:
            for part in data if isinstance(data, tuple) else (data,):
                f.write(part)
            f.flush()
            if fsync is not None:
                fsync(f.fileno())
        # MicroPython on a board: LittleFS committed the file on close; ``os.sync`` (ESP32,
        # RP2) flushes the block device's cache. CPython's would flush every file system.
        if fsync is None and hasattr(os, "sync"):
            os.sync()
        os.rename(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    if fsync is not None and hasattr(os, "O_RDONLY"):  # POSIX: the rename durable too
        fd = os.open((path.rsplit("/", 1)[0] or "/") if "/" in path else ".", os.O_RDONLY)
        try:
            fsync(fd)
        finally:
            os.close(fd)
