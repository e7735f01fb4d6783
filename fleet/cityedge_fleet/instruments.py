"""What the fleet process counts as it happens, for ``/metrics`` (``metrics``): one
registry for the process (the audit log and the API are the process's, whatever app object
serves them). No fleet imports here: ``audit`` counts into it, and ``metrics`` reads the
database through modules that write the audit log."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

PREFIX = "cityedge_fleet_"

INSTRUMENTS = CollectorRegistry(auto_describe=True)
AUDIT_EVENTS = Counter(PREFIX + "audit_events", "Audit rows written, by action and outcome.",
                       ["action", "outcome"], registry=INSTRUMENTS)
HTTP_SECONDS = Histogram(PREFIX + "http_request_duration_seconds",
                         "API request time, by method, route template and status.",
                         ["method", "route", "status"], registry=INSTRUMENTS,
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
OTA_THROTTLED = Counter(PREFIX + "ota_download_throttled",
                        "OTA download requests refused 429 by a device's budget, by what ran "
                        "out (requests or bytes).", ["what"], registry=INSTRUMENTS)
OTA_SERVED_BYTES = Counter(PREFIX + "ota_download_bytes",
                           "Bytes of OTA manifests, key lists and artifacts admitted to be "
                           "served to devices.", registry=INSTRUMENTS)
OPENDATA_TIMEOUTS = Counter(PREFIX + "opendata_query_timeouts",
                            "Open-data requests whose queries ran over "
                            "limits.sta_statement_timeout_ms and were stopped (400).",
                            registry=INSTRUMENTS)
ProcessCollector(registry=INSTRUMENTS)
PlatformCollector(registry=INSTRUMENTS)


def count_audit(action: str, outcome: str) -> None:
    AUDIT_EVENTS.labels(action=action, outcome=outcome).inc()
