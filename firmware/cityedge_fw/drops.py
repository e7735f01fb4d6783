"""The agent's drop ledger: what the batches the ring buffer drops cost.

Loaded only when the ring buffer drops batches (its byte budget is full, or a file failed
its CRC: ``Agent._on_drop``) and unloaded after. A reading batch's count is in its file
header; the CBOR decoder loads only for a batch without one (a drop record, which passes
on what it reported). A tally is ``[first_seq, last_seq, batches, readings]``; the agent
persists it before the files go and reports it in a signed drop record once the link is
up (``agent`` module docstring).
"""

from cityedge_core import batch as batchmod
from cityedge_core import cbor, cose
from cityedge_core.errors import PeerError


def tally(seq, signed):
    """What losing stored batch ``seq`` costs.

    A reading batch is itself: one batch and its records. A drop record that is itself
    dropped passes on what it reported, so the next drop record still has exact counts."""
    try:
        obj = cbor.loads(cose.split_sign1(signed)[2])
        if obj.get(batchmod.F_KIND) == batchmod.KIND_DROP:
            first, _last, batches, readings = obj[batchmod.F_DROPPED]
            return [first, seq, batches + 1, readings]
        return [seq, seq, 1, len(obj.get(batchmod.F_RECORDS, ()))]
    except (PeerError, AttributeError, TypeError, KeyError, ValueError):
        return [seq, seq, 1, 0]  # unreadable: the batch is lost, its readings unknown


def merge(a, b):
    """One tally for two (either may be None: nothing)."""
    if a is None:
        return b
    if b is None:
        return a
    return [min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2], a[3] + b[3]]


def cost(store, seqs):
    """The tally of losing the stored batches ``seqs`` (still on flash: the ring buffer
    asks before it deletes them). A reading batch's count comes from its header
    (``meta``: readings + 1, see ``Agent``); only a batch without one (a drop record, a
    file from older firmware) is read and decoded, one at a time; a file that fails its
    CRC costs its header's count, or 0 readings if that is gone too."""
    out = None
    for seq in seqs:
        meta = store.meta(seq)
        if meta:
            out = merge(out, [seq, seq, 1, meta - 1])
            continue
        data = store.read(seq)
        out = merge(out, [seq, seq, 1, 0] if data is None else tally(seq, data))
        data = None
    return out
