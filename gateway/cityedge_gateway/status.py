"""The gateway's health, two ways: a signed status message and Prometheus metrics.

``status_map`` gathers buffer depth and oldest age, drops, per-input error counts (and
per Modbus slave where a port has several),
per-node verification failures, the supervised tasks' restarts, the fleet commands
answered and the key in use (kid, key slot) into one CBOR map;
``sign_status`` wraps it in COSE_Sign1 with the gateway's key (published on
``ce/v1/<gateway>/up/status``, so the fleet can trust what a gateway says about itself).
``metrics.GatewayCollector`` serves the same numbers to Prometheus (``/metrics`` on
localhost).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cityedge_core import cbor, cose

if TYPE_CHECKING:
    from .service import Gateway


def status_map(gw: Gateway, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    store = gw.store
    node_drops = store.node_drops()
    return {
        "device": gw.cfg.device,
        "time": int(now),
        "boot": store.boot,
        "buffer": {
            "batches": store.depth(),
            "bytes": store.used_bytes,
            "budget_bytes": store.budget_bytes,
            "oldest_age_s": int(store.oldest_age_s(now)),
            "dropped_batches": store.dropped_batches,
            "dropped_readings": store.dropped_readings,
        },
        "inputs": {
            i.cfg.name: {
                "connected": i.stats.connected,
                "readings": i.stats.readings,
                "disconnects": i.stats.disconnects,
                "errors": dict(sorted(i.stats.errors.items())),
                **({"slaves": {
                    name: {"readings": sl.readings, "errors": dict(sorted(sl.errors.items()))}
                    for name, sl in i.stats.slaves.items()
                }} if i.stats.slaves else {}),
            }
            for i in gw.inputs
        },
        "tasks": {
            name: {"running": h.running, "restarts": h.restarts, "last_error": h.last_error}
            for name, h in sorted(gw.supervisor.health.items())
        },
        "nodes": {
            device: {
                "accepted": s.accepted,
                "duplicates": s.duplicates,
                "failures": dict(sorted(s.failures.items())),
                "dropped_batches": node_drops.get(device, (0, 0))[0],
            }
            for device, s in gw.relay.stats.items()
        },
        "commands": _commands(gw),
        "identity": _identity(gw),
        "update": _update(gw),
    }


def _update(gw: Gateway) -> dict[str, Any]:
    """The update's stage (``enabled`` False: no ``[update]`` configured)."""
    if gw.updates is None:
        return {"enabled": False}
    out: dict[str, Any] = {"enabled": True}
    try:  # read at each status: every stage shows, whoever moved it (a small file)
        out.update(gw.updates.record().public())
    except Exception as e:
        out["error"] = ("%s: %s" % (type(e).__name__, e))[:200]
    if gw.update_error:
        out["error"] = gw.update_error
    return out


def _identity(gw: Gateway) -> dict[str, Any]:
    """The key in use (its kid), and its slot when the key slots hold it."""
    out: dict[str, Any] = {"kid": gw.signer.kid.hex()}
    if gw.identity is not None:
        out["slot"] = gw.identity.slot
        f = gw.forwarder
        out["switches"] = f.stats.identity_switches if f is not None else 0
    return out


def _commands(gw: Gateway) -> dict[str, Any]:
    """The fleet commands answered (``enabled`` False: no fleet key trusted)."""
    r = gw.responder
    if r is None:
        return {"enabled": False}
    s = r.stats
    out: dict[str, Any] = {"enabled": True, "accepted": s.accepted, "answered": s.answered,
                           "repeats": s.repeats, "refused": s.refused, "foreign": s.foreign,
                           "rejected": s.rejected, "last_error": s.last_error}
    t = gw.fleet_trust
    if t is not None:  # the trust store: its version, and trust-updates by outcome
        out["trust"] = {"version": t.version, "kids": sorted(k.hex() for k in t.trusted()),
                        "broken": t.broken, "dropped": list(t.dropped), **t.stats.as_dict()}
    return out


def sign_status(gw: Gateway, now: float | None = None) -> bytes:
    signer = gw.signer
    return cose.encode_sign1(cbor.dumps(status_map(gw, now)), signer, signer.kid)
