"""The gateway's health, two ways: a signed status message and Prometheus metrics.

``status_map`` gathers buffer depth and oldest age, drops, per-input error counts (and
per Modbus slave where a port has several),
per-node verification failures, the supervised tasks' restarts, the fleet commands
answered and the key in use (kid, key slot) into one CBOR map;
``sign_status`` wraps it in COSE_Sign1 with the gateway's key (published on
``ce/v1/<gateway>/up/status``, so the fleet can trust what a gateway says about itself).
``metrics_text`` renders the same numbers in the Prometheus text exposition format
(version 0.0.4) for ``/metrics`` on localhost.
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
                        **t.stats.as_dict()}
    return out


def sign_status(gw: Gateway, now: float | None = None) -> bytes:
    signer = gw.signer
    return cose.encode_sign1(cbor.dumps(status_map(gw, now)), signer, signer.kid)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(gw: Gateway) -> str:
    st = status_map(gw)
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        out.append("# HELP cityedge_gateway_%s %s" % (name, help_))
        out.append("# TYPE cityedge_gateway_%s %s" % (name, kind))
        for labels, value in samples:
            lbl = ",".join('%s="%s"' % (k, _esc(v)) for k, v in labels.items())
            out.append(
                "cityedge_gateway_%s%s %s" % (name, "{%s}" % lbl if lbl else "", float(value))
            )

    b = st["buffer"]
    metric(
        "buffer_batches", "gauge", "Batches waiting for the broker's PUBACK.", [({}, b["batches"])]
    )
    metric("buffer_bytes", "gauge", "Bytes counted against the disk budget.", [({}, b["bytes"])])
    metric("buffer_budget_bytes", "gauge", "Disk budget of the buffer.", [({}, b["budget_bytes"])])
    metric(
        "buffer_oldest_age_seconds",
        "gauge",
        "Age of the oldest buffered batch.",
        [({}, b["oldest_age_s"])],
    )
    metric(
        "dropped_batches_total",
        "counter",
        "Batches dropped for the budget since start.",
        [({}, b["dropped_batches"])],
    )
    metric(
        "dropped_readings_total",
        "counter",
        "Readings dropped for the budget since start.",
        [({}, b["dropped_readings"])],
    )
    ins = st["inputs"]
    metric(
        "serial_connected",
        "gauge",
        "1 if the serial port is open.",
        [({"input": n}, int(s["connected"])) for n, s in ins.items()],
    )
    metric(
        "serial_readings_total",
        "counter",
        "Readings decoded from the input.",
        [({"input": n}, s["readings"]) for n, s in ins.items()],
    )
    metric(
        "serial_disconnects_total",
        "counter",
        "Times the port was lost (cable unplugged).",
        [({"input": n}, s["disconnects"]) for n, s in ins.items()],
    )
    errors = [({"input": n, "kind": k}, c) for n, s in ins.items() for k, c in s["errors"].items()]
    metric("serial_errors_total", "counter", "Frame errors by kind.", errors)
    slaves = [(n, sn, sl) for n, s in ins.items() for sn, sl in s.get("slaves", {}).items()]
    metric("modbus_slave_readings_total", "counter",
           "Readings from one Modbus slave of a port with several.",
           [({"input": n, "slave": sn}, sl["readings"]) for n, sn, sl in slaves])
    metric("modbus_slave_errors_total", "counter",
           "Errors of one Modbus slave of a port with several, by kind.",
           [({"input": n, "slave": sn, "kind": k}, c)
            for n, sn, sl in slaves for k, c in sl["errors"].items()])
    nodes = st["nodes"]
    metric(
        "node_batches_accepted_total",
        "counter",
        "Node batches verified and relayed.",
        [({"node": d}, s["accepted"]) for d, s in nodes.items()],
    )
    rejected = [
        ({"node": d, "reason": k}, c) for d, s in nodes.items() for k, c in s["failures"].items()
    ]
    metric("node_batches_rejected_total", "counter", "Node batches rejected, by reason.", rejected)
    tasks = st["tasks"]
    metric("task_running", "gauge", "1 while the supervised task runs.",
           [({"task": n}, int(t["running"])) for n, t in tasks.items()])
    metric("task_restarts_total", "counter", "Times the task failed or ended and was restarted.",
           [({"task": n}, t["restarts"]) for n, t in tasks.items()])
    cmds = st["commands"]
    metric("commands_total", "counter", "Fleet commands by what became of them.",
           [({"outcome": k}, cmds.get(k, 0))
            for k in ("accepted", "answered", "repeats", "refused", "foreign", "rejected")])
    upd = st["update"]
    if upd["enabled"] and "state" in upd:
        metric("update_installed_sequence", "gauge",
               "Sequence of the committed release (the anti-rollback floor).",
               [({"version": upd["installed_version"]}, upd["installed_sequence"])])
        metric("update_state", "gauge", "1 for the update's current stage.",
               [({"state": upd["state"], "version": upd["version"]}, 1)])
    trust = cmds.get("trust")
    if trust is not None:
        metric("fleet_trust_version", "gauge", "Version of the root's trust statement held "
               "(0: the configured fleet keys).", [({}, trust["version"])])
        metric("trust_updates_total", "counter", "trust-update commands by outcome.",
               [({"outcome": k}, trust[k])
                for k in ("installed", "no_root", "malformed", "not_root", "bad_signature",
                          "outside_window", "rollback")])
    f = gw.forwarder.stats if gw.forwarder is not None else None
    metric(
        "mqtt_connected",
        "gauge",
        "1 if connected to the city broker.",
        [({}, int(f.connected) if f else 0)],
    )
    metric(
        "mqtt_published_total",
        "counter",
        "Batches acknowledged by the broker (PUBACK).",
        [({}, f.published if f else 0)],
    )
    metric(
        "mqtt_connect_failures_total",
        "counter",
        "Lost or failed broker connections.",
        [({}, f.connect_failures if f else 0)],
    )
    return "\n".join(out) + "\n"
