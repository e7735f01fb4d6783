"""A C-backed CBOR decoder (``cbor2``) for CPython hot paths, held to the core's rules.

The shared core's decoder is the reference. ``cbor2`` is much faster on CPython, but 5.x
ignores trailing bytes and accepts two-byte simple values below 32 (RFC 8949 §3.3 says
not well-formed). ``loads`` rejects trailing bytes itself; a stray simple value cannot pass
``Batch.from_map``, which checks the type of every field it knows, and that is the only
consumer. Only a batch payload goes through here, and only after its signature verified.
``tests/core/test_fastcbor.py`` checks that core and fast path agree on every vector, on
every batch, and on generated inputs.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2
from cityedge_core import limits
from cityedge_core.errors import LimitError, MalformedError


def loads(data: bytes, max_bytes: int = limits.BATCH_MAX_BYTES) -> Any:
    """Decode exactly one CBOR item like ``cityedge_core.cbor.loads`` does, faster."""
    if len(data) > max_bytes:
        raise LimitError("CBOR: input of %d bytes exceeds %d" % (len(data), max_bytes))
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, RecursionError) as e:
        raise MalformedError("CBOR: %s" % e) from e
    if fp.tell() != len(data):
        raise MalformedError("CBOR: %d trailing bytes after the item" % (len(data) - fp.tell()))
    return obj
