"""SenML records of a verified batch -> rows of the ``reading`` table, fast.

``cityedge_core.senml.resolve`` is the reference for base-field resolution (RFC 8428 §4.6);
it validates the pack again and checks every resolved name character by character, which
was a third of the ingest's time. The batch reaching here already passed
``Batch.from_map`` (``senml.validate_pack``: field types and limits), so ``rows`` applies
the same resolution rules straight into row tuples, and checks names against a cache of
names the reference already accepted: a batch with a name not seen before is resolved by
``senml.resolve`` itself (which raises ``MalformedError`` for a bad name) and its names
are remembered. ``tests/fleet/test_fleet_reading_rows.py`` holds ``rows`` to the
reference on generated packs (same rows, same refusals).

Rows hold what the ``reading`` columns store, for anything the core accepts: the time,
value and sum as floats (a sum of two 64-bit integers does not fit SQLite's INTEGER), and
a resolved time, value or sum that is not finite is refused as the reference refuses it.
"""

from __future__ import annotations

from typing import Any

from cityedge_core import senml
from cityedge_core.errors import MalformedError
from cityedge_core.senml import BN, BS, BT, BU, BV, VB, VD, VS, N, S, T, U, V

NAME_CACHE_MAX = 100_000  # resolved names remembered as valid (then the cache restarts)
RELATIVE_LIMIT = 2**28  # seconds: a resolved time below it is relative to ``now`` (§4.5.3)

_valid_names: set[str] = set()


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _row(device: str, rec: dict[Any, Any], tail: tuple[Any, ...]) -> tuple[Any, ...]:
    """One row from a record ``senml.resolve`` returned (the reference path)."""
    vd = rec.get(VD)
    return (device, float(rec[T]), rec[N], rec.get(U), _float(rec.get(V)), rec.get(VS),
            rec.get(VB), vd.hex() if isinstance(vd, bytes) else None, _float(rec.get(S)),
            *tail)


def reference_rows(device: str, records: list[Any], now: float,
                   tail: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """``rows`` computed with ``senml.resolve`` (remembers the names it accepted)."""
    resolved = senml.resolve(records, now)
    if len(_valid_names) > NAME_CACHE_MAX:
        _valid_names.clear()
    _valid_names.update(rec[N] for rec in resolved)
    return [_row(device, rec, tail) for rec in resolved]


def rows(device: str, records: list[Any], now: float,
         tail: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows ``(device, t, name, unit, value, vs, vb, vd-hex, sum, *tail)`` of a validated
    pack; raises ``MalformedError`` where ``senml.resolve`` would."""
    out: list[tuple[Any, ...]] = []
    names = _valid_names
    bn = ""
    bt: float = 0
    bu = None
    bv: float = 0
    bs: float = 0
    for rec in records:
        if BN in rec:
            bn = rec[BN]
        if BT in rec:
            bt = rec[BT]
        if BU in rec:
            bu = rec[BU]
        if BV in rec:
            bv = rec[BV]
        if BS in rec:
            bs = rec[BS]
        name = bn + rec.get(N, "")
        if name not in names:
            return reference_rows(device, records, now, tail)
        t = bt + rec.get(T, 0)
        if t < RELATIVE_LIMIT:
            t = now + t
        vs = rec.get(VS)
        vb = rec.get(VB)
        vd = rec.get(VD)
        if V in rec:
            value = bv + rec[V]
        elif BV in rec and not (vs is not None or vb is not None or vd is not None
                                or S in rec):
            value = bv
        else:
            value = None
        if S in rec:
            total = bs + rec[S]
        elif BS in rec and not (value is not None or vs is not None or vb is not None
                                or vd is not None):
            total = bs
        else:
            total = None
        nvals = ((value is not None) + (vs is not None) + (vb is not None)
                 + (vd is not None))
        if nvals > 1:
            raise MalformedError("SenML: record %r has more than one value" % name)
        if nvals == 0 and total is None:
            raise MalformedError("SenML: record %r has no value and no sum" % name)
        t = float(t)
        if value is not None:
            value = float(value)
        if total is not None:
            total = float(total)
        if t - t or (value is not None and value - value) or (total is not None
                                                             and total - total):
            raise MalformedError("SenML: record %r: time, value or sum not finite" % name)
        out.append((device, t, name, rec.get(U, bu), value, vs, vb,
                    vd.hex() if vd is not None else None, total, *tail))
    return out
