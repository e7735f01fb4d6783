"""Durable storage on flash: the ring buffer of signed batches and a small atomic state file.

``RingBuffer`` keeps every signed batch the agent has accepted until the broker
acknowledged it (PUBACK), within a byte budget. Each batch is one file ``<seq as 12 hex
digits>.b`` in ``root_dir``, framed as ``magic "CEB1" | seq u48 + meta u16 | length u32 |
CRC-32 u32 | data`` (little endian, 20-byte header; the middle field is the u64 ``seq |
meta << 48``). ``meta`` is the caller's 16 bits about the batch, readable without reading
the batch (``RingBuffer.meta``): the agent keeps the reading count plus one there, so
dropping a batch for space counts its readings without decoding it; 0 means "not recorded".
Files are written power-cut safe (``files.write_atomic``: ``<name>.tmp``, flushed and
synced, renamed into place), so a batch file either exists complete or not at all; stray
``.tmp`` files are deleted when the buffer is opened. The CRC catches what atomicity
cannot (a flash bit error, a foreign file system): a file that fails it is counted as
dropped, never handed out.

When an append would exceed the budget, the oldest batches are dropped first, except those
in ``keep`` (the owner's batches sent and not yet acknowledged: the fleet may have them,
so they are not the ones to report lost); only when nothing else is left do those go too.
A file that fails its CRC is dropped as well. Every drop is handed to the owner's
``on_drop(seqs)`` *before* any file is deleted (the files can still be read there): the
owner keeps the one drop ledger (the agent's signed drop records) and must have it on
flash when ``on_drop`` returns. Then ``floor`` (the highest seq dropped for space, with
the ``keep`` batches below it) goes to ``drops.cbor``, so the reopen finishes a drop that
a power cut interrupted instead of handing out a batch the owner already counted lost.
Without an owner the store only counts (``dropped``: batches, for tests and tools).

Errors: flash failures are ``StorageError`` (a ``LocalError``) carrying the OSError text;
they are raised ``from None`` because MicroPython warns on every chained exception.

``State`` is a small key/value file (a CBOR map, via ``cityedge_core.cbor``) written the same
way (``files.write_atomic``): after a power cut it holds either the old or the new values.

Measured heap (MicroPython 1.29 unix port, 64-bit, .mpy in a ROMFS image, 1 KiB
batches): importing this module costs 6.0 KB (function objects, string constants,
interned names; frozen into a board image less); an open buffer keeps 0.5 KB whether it
holds no batch or 200 (the index is runs of consecutive sequence numbers, see
``RingBuffer``); ``next_after`` into the caller's buffer allocates 0.16 KB, without one
the batch's size plus 0.1 KB.
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
from cityedge_core.errors import MalformedError, StorageError, text

from .files import write_atomic

_MAGIC = const(b"CEB1")
_HEADER_FMT = const("<4sQII")  # magic, seq | meta << 48, data length, CRC-32 of data
_SEQ_MASK = const(0xFFFFFFFFFFFF)  # the low 48 bits of the second field: seq
HEADER_SIZE = const(20)  # bytes of framing in front of every stored batch
_NAME_DIGITS = const(12)  # hex digits of seq in a file name (seq is at most 48 bits)
_SUFFIX = const(".b")
_TMP = const(".tmp")
_DROPS_FILE = const("drops.cbor")
# The messages this module raises, one string constant (``cityedge_fw.text``): each string
# constant over 10 characters is an object of its own on the device heap
_TEXTS = const("state: cannot %s %s: %s|state: %s is corrupt: %s|state: %s is not a map|"
               "ring buffer: budget must be more than %d bytes|"
               "ring buffer: cannot open %s: %s|ring buffer: cannot %s batch %d: %s|"
               "ring buffer: seq out of range|ring buffer: meta out of range|"
               "ring buffer: seq %d not after %d|"
               "ring buffer: a %d-byte batch exceeds the budget")
_M_STATE = const(0)
_M_CORRUPT = const(1)
_M_NOT_MAP = const(2)
_M_BUDGET = const(3)
_M_OPEN = const(4)
_M_BATCH = const(5)
_M_SEQ = const(6)
_M_META = const(7)
_M_ORDER = const(8)
_M_TOO_LARGE = const(9)
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


def _entries(root: str):
    """``(name, size)`` of each entry in ``root``, one at a time (MicroPython's
    ``os.ilistdir`` gives the size on LittleFS; -1 where a port does not say)."""
    walk = getattr(os, "ilistdir", None)
    if walk is None:  # CPython
        for entry in os.scandir(root):
            yield entry.name, entry.stat().st_size
        return
    for entry in walk(root):
        yield entry[0], entry[3] if len(entry) > 3 else -1


def _put(values: dict, key: str, value: object) -> None:
    """``values[key] = value``; None deletes the key."""
    if value is None:
        values.pop(key, None)
    else:
        values[key] = value


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
                raise StorageError(text(_TEXTS, _M_STATE, ("read", path, e))) from None
            return
        try:
            obj = cbor.loads(raw)
        except MalformedError as e:
            raise StorageError(text(_TEXTS, _M_CORRUPT, (path, e))) from None
        if not isinstance(obj, dict):
            raise StorageError(text(_TEXTS, _M_NOT_MAP, (path,)))
        self._values = obj

    def get(self, key: str, default: object = None) -> object:
        return self._values.get(key, default)

    def set(self, **kv: object) -> None:
        # Changed in place and put back if the write fails: the agent sets the chain head
        # after every batch, and a fresh map each time would move about a small heap.
        values = self._values
        old = {}
        for key in kv:
            old[key] = values.get(key)
            _put(values, key, kv[key])
        try:
            write_atomic(self.path, cbor.dumps(values))
        except OSError as e:
            for key in old:
                _put(values, key, old[key])
            raise StorageError(text(_TEXTS, _M_STATE, ("write", self.path, e))) from None


class RingBuffer:
    """Signed batches on flash, oldest first, within ``budget_bytes`` (data + 20-byte headers).

    ``append(seq, data)`` is durable when it returns. ``remove(seq)`` after the broker's PUBACK.
    What the budget or a CRC forces out goes to ``on_drop`` (see the module docstring).

    The in-RAM index is a list of runs of consecutive sequence numbers (``[first, last,
    first, last, ...]``, ascending): the agent numbers batches one after the other and the
    broker acknowledges them in order, so a backlog of any length is one run, a few small
    ints, and never re-allocates as it grows. File sizes are not kept: the budget's count
    takes a file's size from the directory when it is opened, appended or removed.
    """

    def __init__(self, root_dir: str, budget_bytes: int) -> None:
        if budget_bytes <= HEADER_SIZE:
            raise ValueError(text(_TEXTS, _M_BUDGET, (HEADER_SIZE,)))
        self.root = root_dir.rstrip("/") or "/"
        self.budget = budget_bytes
        self._runs = []  # type: list  # [first, last, first, last, ...] ascending, disjoint
        self.count = 0  # batches held
        self._used = 0
        self._hdr = bytearray(HEADER_SIZE)
        self.on_drop = None  # the owner's ledger: on_drop(seqs), before deletion
        self.keep = []  # type: list  # seqs the owner sent, not yet acknowledged: dropped last
        self.dropped = 0  # batches dropped (budget or CRC), this run
        self._floor = 0  # highest seq ever dropped for space: files at or below it are gone
        self._kept = []  # type: list  # seqs below the floor that were kept, not dropped
        try:
            _makedirs(self.root)
            self._drops = State(_join(self.root, _DROPS_FILE))
            self._floor = self._drops.get("floor", 0)  # type: ignore[assignment]
            self._kept = self._drops.get("kept", [])  # type: ignore[assignment]
            self._recover()
        except OSError as e:
            raise StorageError(text(_TEXTS, _M_OPEN, (self.root, e))) from None

    # -- opening --------------------------------------------------------------

    def _recover(self) -> None:
        floor = self._floor
        stray = []  # deleted after the directory walk, not during it
        for name, size in _entries(self.root):
            if name.endswith(_TMP):  # a write the power cut interrupted: never acknowledged
                stray.append(name)
                continue
            if len(name) != _NAME_DIGITS + len(_SUFFIX) or not name.endswith(_SUFFIX):
                continue
            try:
                seq = int(name[:_NAME_DIGITS], 16)
            except ValueError:
                continue
            if seq <= floor and seq not in self._kept:  # dropped and recorded, the delete
                # was cut short
                stray.append(name)
                continue
            self._insert(seq)
            self._used += size if size >= 0 else self.size(seq)
        for name in stray:
            os.remove(_join(self.root, name))

    # -- the index of runs ----------------------------------------------------

    def _insert(self, seq: int) -> None:
        """Add ``seq`` to the runs (any order; ``append`` always adds after the last)."""
        r = self._runs
        i = len(r)
        while i and r[i - 2] > seq:  # i: the first run that starts after seq
            i -= 2
        if i and r[i - 1] >= seq:
            return  # held already
        if i and r[i - 1] == seq - 1:
            r[i - 1] = seq
            if i < len(r) and r[i] == seq + 1:  # it closed the gap to the next run
                r[i - 1] = r[i + 1]
                r.pop(i)
                r.pop(i)
        elif i < len(r) and r[i] == seq + 1:
            r[i] = seq
        else:
            r.insert(i, seq)
            r.insert(i, seq)
        self.count += 1

    def _discard(self, seq: int) -> bool:
        r = self._runs
        for i in range(0, len(r), 2):
            first = r[i]
            last = r[i + 1]
            if seq < first:
                return False
            if seq > last:
                continue
            if first == last:
                r.pop(i)
                r.pop(i)
            elif seq == first:
                r[i] = seq + 1
            elif seq == last:
                r[i + 1] = seq - 1
            else:  # split the run around seq
                r.insert(i + 1, seq + 1)
                r.insert(i + 1, seq - 1)
            self.count -= 1
            return True
        return False

    def _holds(self, seq: int) -> bool:
        return self.seq_after(seq - 1) == seq

    def seq_after(self, after: int) -> int:
        """The oldest seq held above ``after``, or 0 (reads nothing from flash)."""
        r = self._runs
        for i in range(1, len(r), 2):
            if r[i] > after:
                return r[i - 1] if r[i - 1] > after else after + 1
        return 0

    # -- queries --------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def newest(self) -> int:
        """The highest seq held, or 0."""
        return self._runs[-1] if self._runs else 0

    def _path(self, seq: int) -> str:
        return _join(self.root, "%012x%s" % (seq, _SUFFIX))

    def size(self, seq: int) -> int:
        """Bytes batch ``seq`` takes on flash (header included, what the budget counts);
        0 if its file is gone."""
        try:
            return os.stat(self._path(seq))[6]
        except OSError as e:
            if e.args and e.args[0] == _ENOENT:
                return 0
            raise StorageError(text(_TEXTS, _M_BATCH, ("stat", seq, e))) from None

    # -- writing --------------------------------------------------------------

    def append(self, seq: int, data: bytes | tuple, meta: int = 0) -> None:
        """Store one signed batch; durable on return. StorageError if the flash fails.

        ``data`` is the batch's bytes or a tuple of its consecutive chunks (written one
        after the other: a device never joins them into one object in RAM). ``meta``
        (0-65535) goes into the header, for ``meta``."""
        if seq < 1 or seq > _SEQ_MASK:
            raise ValueError(text(_TEXTS, _M_SEQ))
        if meta < 0 or meta > 0xFFFF:
            raise ValueError(text(_TEXTS, _M_META))
        if self._runs and seq <= self._runs[-1]:
            raise ValueError(text(_TEXTS, _M_ORDER, (seq, self._runs[-1])))
        chunks = data if isinstance(data, tuple) else (data,)
        size = crc = 0
        for chunk in chunks:
            size += len(chunk)
            crc = crc32(chunk, crc)
        need = HEADER_SIZE + size
        if need > self.budget:
            raise ValueError(text(_TEXTS, _M_TOO_LARGE, (size,)))
        excess = self._used + need - self.budget
        if excess > 0:
            self._drop_oldest(excess)
        header = struct.pack(_HEADER_FMT, _MAGIC, seq | meta << 48, size, crc & 0xFFFFFFFF)
        while True:
            try:
                write_atomic(self._path(seq), (header,) + chunks)
                break
            except OSError as e:
                # The file system filled up before the budget did (budget set too large for
                # the partition): make room the same recorded way, or give up.
                if e.args and e.args[0] == _ENOSPC and self.count:
                    self._drop_oldest(1)
                    continue
                raise StorageError(text(_TEXTS, _M_BATCH, ("store", seq, e))) from None
        self._insert(seq)
        self._used += need

    def remove(self, seq: int) -> bool:
        """Forget a batch the broker acknowledged. False if it was not held (already gone)."""
        if not self._discard(seq):
            return False
        self._unlink(seq, "remove")
        return True

    def _unlink(self, seq: int, what: str) -> None:
        """Delete the file of ``seq`` (already out of the index) and count its bytes free."""
        size = self.size(seq)
        try:
            os.remove(self._path(seq))
        except OSError as e:
            if e.args and e.args[0] != _ENOENT:
                raise StorageError(text(_TEXTS, _M_BATCH, (what, seq, e))) from None
        self._used = max(0, self._used - size)

    def _drop_oldest(self, nbytes: int) -> None:
        """Drop the oldest batches until ``nbytes`` are freed, those in ``keep`` last;
        the owner records them first, the floor is saved second, files deleted third."""
        doomed = []
        freed = 0
        for skip in (self.keep, ()):
            seq = 0
            while freed < nbytes:
                seq = self.seq_after(seq)
                if not seq:
                    break
                if seq in skip or seq in doomed:
                    continue
                freed += self.size(seq)
                doomed.append(seq)
            if freed >= nbytes:
                break
        if not doomed:
            return
        last = max(doomed)
        if last > self._floor:
            self._floor = last
        self._drop(doomed, True)

    def _drop(self, seqs: list, space: bool) -> None:
        """Hand ``seqs`` to the owner's ledger, then (for space) save the floor, then
        delete their files."""
        if self.on_drop is not None:
            self.on_drop(seqs)
        self.dropped += len(seqs)
        if space:  # held below the new floor, not dropped: the reopen must not delete them
            kept = []
            for s in self._kept + self.keep:
                if s < self._floor and s not in seqs and s not in kept and self._holds(s):
                    kept.append(s)
            self._kept = kept
            self._drops.set(floor=self._floor, kept=self._kept or None)
        for seq in seqs:
            self._discard(seq)
            self._unlink(seq, "drop")

    # -- reading --------------------------------------------------------------

    def next_after(self, after: int, into: bytearray | None = None) -> tuple | None:
        """The oldest ``(seq, data)`` with ``seq > after``, or None; reads only that file
        (the forwarder's next batch, past those already handed to MQTT). Corrupt files
        are dropped through ``on_drop``: counted, never handed out.

        With ``into`` (a bytearray the caller keeps) a batch that fits is read into it and
        ``data`` is a memoryview of it, valid until the next read into the same buffer:
        a device forwarding batch after batch then needs no fresh block of the batch's
        size each time, which a fragmented heap may not have. A larger batch is read into
        new bytes as without ``into``."""
        while True:
            seq = self.seq_after(after)
            if not seq:
                return None
            data = self._read(seq, into)
            if data is not None:
                return seq, data
            # failed its framing or CRC: dropped through the owner's ledger; floor stays
            # (it is not necessarily the oldest)
            self._drop([seq], False)

    def read(self, seq: int) -> bytes | None:
        """The data of batch ``seq``, or None if its file is gone or fails its framing or
        CRC (nothing is dropped here: for the owner's ``on_drop``)."""
        return self._read(seq)

    def meta(self, seq: int) -> int | None:
        """The ``meta`` that batch ``seq`` was stored with (reads its header only), or None
        if its file is gone or its header is not ours (its data is not checked here)."""
        try:
            with open(self._path(seq), "rb") as f:
                if f.readinto(self._hdr) != HEADER_SIZE:
                    return None
        except OSError as e:
            if e.args and e.args[0] == _ENOENT:
                return None
            raise StorageError(text(_TEXTS, _M_BATCH, ("read", seq, e))) from None
        magic, fseq, _length, _crc = struct.unpack(_HEADER_FMT, self._hdr)
        if magic != _MAGIC or fseq & _SEQ_MASK != seq:
            return None
        return fseq >> 48

    def _read(self, seq: int, into: bytearray | None = None) -> bytes | None:
        """The data of one batch file (in ``into`` if it fits), or None if its framing or
        CRC is wrong."""
        hdr = self._hdr
        try:
            with open(self._path(seq), "rb") as f:
                if f.readinto(hdr) != HEADER_SIZE:
                    return None
                magic, fseq, length, crc = struct.unpack(_HEADER_FMT, hdr)
                if magic != _MAGIC or fseq & _SEQ_MASK != seq or length > self.budget:
                    return None
                if into is not None and length <= len(into):
                    data = memoryview(into)[:length]
                    got = f.readinto(data)
                else:
                    data = f.read(length)
                    got = len(data)
                if f.read(1):  # longer than its header says
                    return None
        except OSError as e:
            if e.args and e.args[0] == _ENOENT:
                return None
            raise StorageError(text(_TEXTS, _M_BATCH, ("read", seq, e))) from None
        if got != length or crc32(data) & 0xFFFFFFFF != crc:
            return None
        return data
