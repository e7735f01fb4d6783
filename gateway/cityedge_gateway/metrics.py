"""The gateway's Prometheus metrics: one custom collector (``GatewayCollector``) over the
same status map the signed status carries, with the client library's process and platform
collectors and a build-info metric beside it, rendered by ``prometheus_client``'s own
exposition code (``metrics_text``) for the loopback ``/metrics`` server
(``metrics_http``)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .status import status_map

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .service import Gateway

PREFIX = "cityedge_gateway_"
Row = tuple[str, str, str, list[tuple[dict[str, str], Any]]]


def _version() -> str:
    try:
        return metadata.version("cityedge")
    except metadata.PackageNotFoundError:
        return "unknown"


def metric_rows(gw: Gateway) -> list[Row]:
    """Every gateway metric as (name, kind, help, samples), read from the status map: the
    signed status and ``/metrics`` say the same things."""
    st = status_map(gw)
    out: list[Row] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        out.append((name, kind, help_, samples))

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
        metric("fleet_trust_broken", "gauge", "1: the installed trust statement was "
               "refused at start (tampered or rolled back); no fleet command is obeyed.",
               [({}, 1 if trust["broken"] else 0)])
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
    return out


class GatewayCollector(Collector):
    """Reads the gateway's state at each scrape (nothing is counted twice: the counts live
    in the parts that own them)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(PREFIX + "build", "The gateway's software and identity.")
        info.add_metric([], {"version": _version(), "device": self.gw.cfg.device})
        yield info
        for name, kind, help_, samples in metric_rows(self.gw):
            labels = list(samples[0][0]) if samples else []
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(PREFIX + name, help_, labels=labels)
            else:
                family = GaugeMetricFamily(PREFIX + name, help_, labels=labels)
            for lbl, value in samples:
                family.add_metric([lbl[k] for k in labels], float(value))
            yield family


def registry_for(gw: Gateway) -> CollectorRegistry:
    """A registry of its own per gateway (not the library's global one): the gateway's
    collector, the process's CPU, memory and file descriptors, the Python platform."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def metrics_text(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry).decode()
