"""Durable storage on flash: the ring buffer of signed batches and a small atomic state file.

``RingBuffer`` keeps every signed batch the agent has accepted until the broker acknowledged
it (PUBACK), within a byte budget. Each batch is one file ``<seq as 12 hex digits>.b`` in
``root_dir``, framed as ``magic "CEB1" | seq u64 | length u32 | CRC-32 u32 | data`` (little
endian, 20-byte header). Files are written power-cut safe: to ``<name>.tmp`` first, then
renamed into place (LittleFS and POSIX renames are atomic), so a batch file either exists
complete or not at all; stray ``.tmp`` files are deleted when the buffer is opened. The CRC
catches what atomicity cannot (a flash bit error, a foreign file system): a file that fails it
is counted as dropped, never handed out.

When an append would exceed the budget, the oldest batches are dropped first and the drop is
recorded (``first_seq``, ``last_seq``, ``batches``) in ``drops.cbor`` *before* any file is
deleted, so a power cut cannot lose a drop report; ``take_drops()`` hands the record out and
the next successful ``append`` (which should store the signed drop record) clears it. A cut
between those two steps reports the same drop twice, never zero times. ``floor`` (the highest
seq ever dropped) lets the reopen finish a drop that a power cut interrupted.

Errors: flash failures are ``StorageError`` (a ``LocalError``) carrying the OSError text;
they are raised ``from None`` because MicroPython warns on every chained exception.

``State`` is a small key/value file (a CBOR map, via ``cityedge_core.cbor``) written the same
way (temp file + rename): after a power cut it holds either the old or the new values.

Measured heap (MicroPython 1.29 unix port, .mpy from ``make firmware``, 1 KiB batches):
importing this module costs 7.7 KB (bytecode in RAM; frozen into a board image it stays in
flash); an open buffer holding 100 batches keeps 2.5 KB (about 10 bytes per further batch);
``append`` allocates 0.8 KB transiently besides the caller's data, ``remove`` 0.3 KB;
``oldest(4)`` allocates the 4 KiB returned plus 2.3 KB.
"""

import os
import struct

try:
    from binascii import crc32
except ImportError:  # pragma: no cover - every port we target has binascii.crc32
    crc32 = None  # type: ignore[assignment]

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


from cityedge_core import cbor
from cityedge_core.errors import MalformedError, StorageError

_MAGIC = b"CEB1"
_HEADER_FMT = "<4sQII"  # magic, seq, data length, CRC-32 of data
HEADER_SIZE = const(20)  # bytes of framing in front of every stored batch
_NAME_DIGITS = const(12)  # hex digits of seq in a file name (seq is at most 48 bits)
_SUFFIX = ".b"
_TMP = ".tmp"
_DROPS_FILE = "drops.cbor"
_ENOENT = const(2)
_ENOSPC = const(28)


def _join(root: str, name: str) -> str:
    return root + "/" + name if root != "/" else "/" + name


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def _makedirs(path: str) -> None:
    """``mkdir -p`` (MicroPython has no ``os.makedirs``)."""
    if not path or path == "/" or _exists(path):
        return
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        _makedirs(parent)
    try:
        os.mkdir(path)
    except OSError:
        if not _exists(path):
            raise


def _fsync(f: object) -> None:
    """Push a file to stable storage (CPython); LittleFS commits on close by itself."""
    fileno = getattr(f, "fileno", None)
    sync = getattr(os, "fsync", None)
    if fileno is not None and sync is not None:
        f.flush()  # type: ignore[attr-defined]
        sync(fileno())


def _sync_dir(path: str) -> None:
    sync = getattr(os, "fsync", None)
    if sync is None or not hasattr(os, "O_RDONLY"):
        return
    fd = os.open(path or ".", os.O_RDONLY)  # type: ignore[attr-defined]
    try:
        sync(fd)
    finally:
        os.close(fd)  # type: ignore[attr-defined]


def _write_atomic(path: str, parts: tuple) -> None:
    """Write ``parts`` (bytes-like) to ``path`` via ``path.tmp`` + rename; OSError on failure."""
    tmp = path + _TMP
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            _fsync(f)
        os.rename(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _sync_dir(path.rsplit("/", 1)[0] if "/" in path else "")


def _merge(a: list | None, b: list | None) -> list | None:
    """Union of two drop records ``[first_seq, last_seq, batches]``."""
    if a is None:
        return b
    if b is None:
        return a
    return [min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2]]


class State:
    """A few values that must survive reboots and power cuts (``seq``, ``head``, ``boot``).

    ``set(**kv)`` replaces the whole file atomically; a value of ``None`` deletes its key.
    Values are anything ``cityedge_core.cbor`` encodes (int, bytes, str, list, dict).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._values = {}  # type: dict
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            if e.args and e.args[0] != _ENOENT:
                raise StorageError("state: cannot read %s: %s" % (path, e)) from None
            return
        try:
            obj = cbor.loads(raw)
        except MalformedError as e:
            raise StorageError("state: %s is corrupt: %s" % (path, e)) from None
        if not isinstance(obj, dict):
            raise StorageError("state: %s is not a map" % path)
        self._values = obj

    def get(self, key: str, default: object = None) -> object:
        return self._values.get(key, default)

    def set(self, **kv: object) -> None:
        new = dict(self._values)
        for key in kv:
            if kv[key] is None:
                new.pop(key, None)
            else:
                new[key] = kv[key]
        try:
            _write_atomic(self.path, (cbor.dumps(new),))
        except OSError as e:
            raise StorageError("state: cannot write %s: %s" % (self.path, e)) from None
        self._values = new

    def __repr__(self) -> str:
        return "State(%r, keys=%r)" % (self.path, sorted(self._values))


class RingBuffer:
    """Signed batches on flash, oldest first, within ``budget_bytes`` (data + 20-byte headers).

    ``append(seq, data)`` is durable when it returns. ``remove(seq)`` after the broker's PUBACK.
    ``take_drops()`` reports what the budget forced out (see the module docstring).
    """

    def __init__(self, root_dir: str, budget_bytes: int) -> None:
        if budget_bytes <= HEADER_SIZE:
            raise ValueError("ring buffer: budget must be more than %d bytes" % HEADER_SIZE)
        self.root = root_dir.rstrip("/") or "/"
        self.budget = budget_bytes
        self._seqs = []  # type: list  # ascending
        self._sizes = []  # type: list  # file size of each entry, same order
        self._used = 0
        self._hdr = bytearray(HEADER_SIZE)
        self._taken = None  # type: list | None  # handed out by take_drops, not yet confirmed
        self._floor = 0  # highest seq ever dropped for space: files at or below it are gone
        self._pending = None  # type: list | None  # dropped, not yet handed out
        try:
            _makedirs(self.root)
            self._drops = State(_join(self.root, _DROPS_FILE))
            self._pending = self._drops.get("p")  # type: ignore[assignment]
            self._floor = self._drops.get("floor", 0)  # type: ignore[assignment]
            self._recover()
        except OSError as e:
            raise StorageError("ring buffer: cannot open %s: %s" % (self.root, e)) from None

    # -- opening --------------------------------------------------------------

    def _recover(self) -> None:
        floor = self._floor
        found = []
        for name in os.listdir(self.root):
            path = _join(self.root, name)
            if name.endswith(_TMP):  # a write the power cut interrupted: never acknowledged
                os.remove(path)
                continue
            if len(name) != _NAME_DIGITS + len(_SUFFIX) or not name.endswith(_SUFFIX):
                continue
            try:
                seq = int(name[:_NAME_DIGITS], 16)
            except ValueError:
                continue
            if seq <= floor:  # dropped and recorded, the delete was cut short
                os.remove(path)
                continue
            found.append(seq)
        found.sort()
        for seq in found:
            size = os.stat(self._path(seq))[6]
            self._seqs.append(seq)
            self._sizes.append(size)
            self._used += size

    # -- queries --------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._seqs)

    @property
    def used_bytes(self) -> int:
        return self._used

    def seqs(self) -> list:
        """Sequence numbers held, oldest first (a copy)."""
        return list(self._seqs)

    def _path(self, seq: int) -> str:
        return _join(self.root, "%012x%s" % (seq, _SUFFIX))

    # -- writing --------------------------------------------------------------

    def append(self, seq: int, data: bytes | tuple) -> None:
        """Store one signed batch; durable on return. StorageError if the flash fails.

        ``data`` is the batch's bytes or a tuple of its consecutive chunks (written one
        after the other: a device never joins them into one object in RAM)."""
        if seq < 1 or seq > 0xFFFFFFFFFFFF:
            raise ValueError("ring buffer: seq out of range")
        if self._seqs and seq <= self._seqs[-1]:
            raise ValueError("ring buffer: seq %d not after %d" % (seq, self._seqs[-1]))
        chunks = data if isinstance(data, tuple) else (data,)
        size = crc = 0
        for chunk in chunks:
            size += len(chunk)
            crc = crc32(chunk, crc)
        need = HEADER_SIZE + size
        if need > self.budget:
            raise ValueError("ring buffer: a %d-byte batch exceeds the budget" % size)
        excess = self._used + need - self.budget
        if excess > 0:
            self._drop_oldest(excess)
        header = struct.pack(_HEADER_FMT, _MAGIC, seq, size, crc & 0xFFFFFFFF)
        while True:
            try:
                _write_atomic(self._path(seq), (header,) + chunks)
                break
            except OSError as e:
                # The file system filled up before the budget did (budget set too large for
                # the partition): make room the same recorded way, or give up.
                if e.args and e.args[0] == _ENOSPC and self._seqs:
                    self._drop_oldest(1)
                    continue
                raise StorageError("ring buffer: cannot store batch %d: %s" % (seq, e)) from None
        self._seqs.append(seq)
        self._sizes.append(need)
        self._used += need
        if self._taken is not None:  # the caller has stored the drop record: confirm it
            self._taken = None
            self._save_drops()

    def remove(self, seq: int) -> bool:
        """Forget a batch the broker acknowledged. False if it was not held (already gone)."""
        try:
            i = self._seqs.index(seq)
        except ValueError:
            return False
        try:
            os.remove(self._path(seq))
        except OSError as e:
            if e.args and e.args[0] != _ENOENT:
                raise StorageError("ring buffer: cannot remove batch %d: %s" % (seq, e)) from None
        self._seqs.pop(i)
        self._used -= self._sizes.pop(i)
        return True

    def _save_drops(self) -> None:
        self._drops.set(p=_merge(self._taken, self._pending), floor=self._floor)

    def _drop_oldest(self, nbytes: int) -> None:
        """Drop the oldest batches until ``nbytes`` are freed; record first, delete second."""
        n = 0
        freed = 0
        while n < len(self._seqs) and freed < nbytes:
            freed += self._sizes[n]
            n += 1
        if n == 0:
            return
        if self._seqs[n - 1] > self._floor:
            self._floor = self._seqs[n - 1]
        self._record_drop(self._seqs[0], self._seqs[n - 1], n)
        for _ in range(n):
            self._delete_head()

    def _record_drop(self, first: int, last: int, batches: int) -> None:
        self._pending = _merge(self._pending, [first, last, batches])
        self._save_drops()

    def _delete_head(self) -> None:
        seq = self._seqs.pop(0)
        self._used -= self._sizes.pop(0)
        try:
            os.remove(self._path(seq))
        except OSError as e:
            if e.args and e.args[0] != _ENOENT:
                raise StorageError("ring buffer: cannot drop batch %d: %s" % (seq, e)) from None

    def take_drops(self) -> list | None:
        """``[first_seq, last_seq, batches]`` dropped since the last call, or None.

        The record stays on flash until the next successful ``append`` (the signed drop
        record), so a power cut before that reports it again rather than losing it.
        """
        got = self._pending
        if got is None:
            return None
        self._taken = _merge(self._taken, got)
        self._pending = None
        return list(got)

    # -- reading --------------------------------------------------------------

    def oldest(self, n: int) -> list:
        """Up to ``n`` ``(seq, data)`` pairs, oldest first. Corrupt files are dropped + recorded."""
        out = []  # type: list
        i = 0
        while len(out) < n and i < len(self._seqs):
            seq = self._seqs[i]
            data = self._read(seq, self._sizes[i])
            if data is None:
                self._drop_corrupt(i)
                continue
            out.append((seq, data))
            i += 1
        return out

    def next_after(self, after: int) -> tuple | None:
        """The oldest ``(seq, data)`` with ``seq > after``, or None; reads only that file
        (the forwarder's next batch, past those already handed to MQTT). Corrupt files
        are dropped + recorded, as in ``oldest``."""
        i = 0
        while i < len(self._seqs):
            seq = self._seqs[i]
            if seq <= after:
                i += 1
                continue
            data = self._read(seq, self._sizes[i])
            if data is None:
                self._drop_corrupt(i)
                continue
            return seq, data
        return None

    def _drop_corrupt(self, i: int) -> None:
        """Entry ``i`` failed its framing or CRC: counted as dropped; floor stays (it is
        not necessarily the oldest)."""
        seq = self._seqs[i]
        self._record_drop(seq, seq, 1)
        self._seqs.pop(i)
        self._used -= self._sizes.pop(i)
        try:
            os.remove(self._path(seq))
        except OSError:
            pass

    def _read(self, seq: int, size: int) -> bytes | None:
        """The data of one batch file, or None if its framing or CRC is wrong."""
        hdr = self._hdr
        try:
            with open(self._path(seq), "rb") as f:
                if f.readinto(hdr) != HEADER_SIZE:
                    return None
                magic, fseq, length, crc = struct.unpack(_HEADER_FMT, hdr)
                if magic != _MAGIC or fseq != seq or length != size - HEADER_SIZE:
                    return None
                data = f.read(length)
        except OSError as e:
            if e.args and e.args[0] == _ENOENT:
                return None
            raise StorageError("ring buffer: cannot read batch %d: %s" % (seq, e)) from None
        if len(data) != length or crc32(data) & 0xFFFFFFFF != crc:
            return None
        return data

    def __repr__(self) -> str:
        return "RingBuffer(%r, %d/%d bytes, %d batches)" % (
            self.root,
            self._used,
            self.budget,
            len(self._seqs),
        )
