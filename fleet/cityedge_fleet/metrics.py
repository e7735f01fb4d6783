"""The fleet's Prometheus metrics, served at ``GET /metrics`` to a ``monitor`` token (a
scraper's role: this endpoint and nothing else).

Two kinds, rendered by ``prometheus_client``'s own exposition code:

- **Counted as it happens, in this process** (``instruments.INSTRUMENTS``): API latency by route
  template and status (a histogram), audit events by action and outcome (enrollments,
  revocations, rotations, campaign steps: counted as each row is written, so a row whose
  transaction rolls back afterwards is counted too), the ingest's verdicts when this
  process runs an ingest worker, and the client library's process and platform metrics.
- **Read at each scrape** (``FleetCollector``): devices by state, certificates in use that
  expire within 7 and 30 days, the published CRL's age and the time left until its next
  update, the highest reading row id (grows while the ingest stores: "ingest stalled" is
  its rate at zero), dead letters waiting, rotation campaign members by state. Each is one
  indexed query; nothing scans the readings or the audit log.

Alert rules and a Grafana dashboard over these names are in ``deploy/prometheus/`` and
``deploy/grafana/``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from cityedge_fleet.instruments import HTTP_SECONDS, INSTRUMENTS, PREFIX

if TYPE_CHECKING:
    from fastapi import FastAPI, Request, Response
    from prometheus_client.metrics_core import Metric

EXPIRY_WINDOWS_DAYS = (7, 30)

def _version() -> str:
    try:
        return metadata.version("cityedge")
    except metadata.PackageNotFoundError:
        return "unknown"


class FleetCollector(Collector):
    """Reads the database and the CA folder at each scrape."""

    def __init__(self, engine: Engine, ca_dir: Path,
                 ingest_counts: Callable[[], dict[str, int] | None] = lambda: None) -> None:
        self.engine = engine
        self.ca_dir = ca_dir
        self.ingest_counts = ingest_counts

    def collect(self) -> Iterator[Metric]:
        from cityedge_fleet.campaign import CampaignState
        from cityedge_fleet.campaign_store import RotationCampaign
        from cityedge_fleet.models import (
            Credential,
            CredentialStatus,
            Device,
            IngestDeadLetter,
            KeyRotation,
            Reading,
        )

        info = InfoMetricFamily(PREFIX + "build", "The fleet's software.")
        info.add_metric([], {"version": _version()})
        yield info
        now = dt.datetime.now(dt.UTC)
        with Session(self.engine) as s:
            devices = GaugeMetricFamily(PREFIX + "devices", "Devices by state.",
                                        labels=["state"])
            for state, n in s.exec(select(Device.state, func.count()).group_by(
                    Device.state)).all():
                devices.add_metric([str(state)], n)
            yield devices
            expiring = GaugeMetricFamily(
                PREFIX + "certificates_expiring", "Certificates in use that expire within "
                "the window (days).", labels=["within_days"])
            for days in EXPIRY_WINDOWS_DAYS:
                n = s.exec(select(func.count()).select_from(Credential).where(
                    Credential.status == CredentialStatus.active,
                    col(Credential.not_after) < now + dt.timedelta(days=days))).one()
                expiring.add_metric([str(days)], n)
            yield expiring
            top = s.exec(select(func.max(Reading.id))).one()
            yield GaugeMetricFamily(PREFIX + "readings_stored_max_id", "The highest reading "
                                    "row id: grows while the ingest stores.", value=top or 0)
            dead = s.exec(select(func.count()).select_from(IngestDeadLetter)).one()
            yield GaugeMetricFamily(PREFIX + "ingest_dead_letters", "Messages kept aside "
                                    "for a replay.", value=dead)
            members = GaugeMetricFamily(PREFIX + "campaign_members", "Members of live "
                                        "rotation campaigns, by campaign and state.",
                                        labels=["campaign", "state"])
            live = [CampaignState.running, CampaignState.paused]
            ids = s.exec(select(RotationCampaign.id).where(
                col(RotationCampaign.state).in_(live))).all()
            if ids:
                for cid, state, n in s.exec(
                        select(KeyRotation.campaign_id, KeyRotation.state, func.count())
                        .where(col(KeyRotation.campaign_id).in_(ids))
                        .group_by(col(KeyRotation.campaign_id), col(KeyRotation.state))).all():
                    members.add_metric([str(cid), str(state)], n)
            yield members
        yield from self._crl(now)
        counts = self.ingest_counts()
        if counts is not None:
            verdicts = CounterMetricFamily(PREFIX + "ingest_batches", "Batches this "
                                           "process's ingest worker judged since start, by "
                                           "verdict.", labels=["verdict"])
            for verdict, n in sorted(counts.items()):
                verdicts.add_metric([verdict], n)
            yield verdicts

    def _crl(self, now: dt.datetime) -> Iterator[Metric]:
        from cityedge_fleet.ca import CRL_FILE, load_crls

        age = GaugeMetricFamily(PREFIX + "crl_age_seconds", "Seconds since the published "
                                "CRL was signed (the oldest, one per intermediate).")
        left = GaugeMetricFamily(PREFIX + "crl_next_update_seconds", "Seconds until the "
                                 "published CRL's next update (the soonest; negative: "
                                 "expired, the broker refuses everyone).")
        try:
            crls = load_crls((self.ca_dir / CRL_FILE).read_bytes())
        except (OSError, ValueError):
            crls = []
        yield GaugeMetricFamily(PREFIX + "crl_present", "1 if a readable CRL is published.",
                                value=1 if crls else 0)
        if crls:
            age.add_metric([], max((now - c.last_update_utc).total_seconds() for c in crls))
            nexts = [c.next_update_utc for c in crls if c.next_update_utc is not None]
            if nexts:
                left.add_metric([], min((n - now).total_seconds() for n in nexts))
            yield age
            yield left


class _Instruments(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from INSTRUMENTS.collect()


def registry_for(app: FastAPI) -> CollectorRegistry:
    """The registry ``/metrics`` renders for ``app``: its database and CA folder, and the
    process's instruments."""
    settings = app.state.settings

    def ingest_counts() -> dict[str, int] | None:
        worker = getattr(app.state, "ingest_worker", None)
        return dict(worker.ingestor.counts) if worker is not None else None

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(app.state.engine, settings.ca_dir, ingest_counts))
    registry.register(_Instruments())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def instrument(app: FastAPI) -> None:
    """Time every request by its route template (``/devices/{device_id}``, never the raw
    path: the label set stays bounded whatever clients send)."""

    @app.middleware("http")
    async def timed(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route: Any = request.scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_SECONDS.labels(method=request.method, route=template,
                                status=str(status)).observe(time.perf_counter() - start)
