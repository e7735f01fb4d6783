"""Test-side views of the device's ring buffer (``cityedge_fw.store.RingBuffer``).

The device's class keeps only what the agent runs (every method of a class the board keeps
loaded is a function object on its heap): the agent reads its backlog one batch at a time
(``next_after``); listing what is held, or reading several batches at once, is for tests.
``tests/firmware/test_store_powercut.py``, which runs on MicroPython, has its own copies.
"""

from __future__ import annotations

from typing import Any


def seqs(rb: Any) -> list[int]:
    """Sequence numbers held, oldest first (from the buffer's index: no file is read)."""
    out: list[int] = []
    r = rb._runs
    for i in range(0, len(r), 2):
        out.extend(range(r[i], r[i + 1] + 1))
    return out


def oldest(rb: Any, n: int) -> list[tuple[int, bytes]]:
    """Up to ``n`` ``(seq, data)`` pairs, oldest first, read as the forwarder reads them
    (``next_after``): corrupt files are dropped through ``on_drop``."""
    out: list[tuple[int, bytes]] = []
    after = 0
    while len(out) < n:
        got = rb.next_after(after)
        if got is None:
            break
        out.append(got)
        after = got[0]
    return out
