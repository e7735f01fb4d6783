"""The console's pages (GET): each reads what its API operation reads, through the same
store functions, for the roles that operation lets in (``web.page_visit``)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from cityedge_core import chain
from cityedge_fleet import (
    audit,
    campaign_store,
    command_queue,
    hw_access,
    ota_store,
    registry,
    renewal,
)
from cityedge_fleet.campaign import CampaignError
from cityedge_fleet.console import access
from cityedge_fleet.console.chart import line_chart
from cityedge_fleet.console.web import ConsoleRefusal, Visit, page_visit, render, require
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.hw_report_store import list_reports
from cityedge_fleet.ingest import DEAD_LETTER
from cityedge_fleet.models import (
    ID_MAX,
    AuditRecord,
    ChainStateRow,
    Device,
    DeviceState,
    IngestEvent,
    Reading,
    utcnow,
)

router = APIRouter(prefix="/console", include_in_schema=False)
READINGS_MAX = 300  # newest readings a device page charts
SERIES_MAX = 4  # charts on a device page (one per reading name)
EVENTS_MAX = 20  # newest ingest events, commands, audit rows on a page
SITES_MAX = 40  # sites in the overview's table (the busiest)
AUDIT_PAGE = 50  # audit rows on one page
Text = Annotated[str | None, Query(max_length=128)]

Overview = Annotated[Visit, page_visit("overview")]
Devices = Annotated[Visit, page_visit("devices")]
Campaigns = Annotated[Visit, page_visit("campaigns")]
Audit = Annotated[Visit, page_visit("audit")]
Enrollment = Annotated[Visit, page_visit("enrollment")]
Hardware = Annotated[Visit, page_visit("hardware")]


def age(when: dt.datetime | None, now: dt.datetime) -> str:
    """'5 min ago', '3 h ago', '12 d ago' or 'never'."""
    if when is None:
        return "never"
    s = (now - when).total_seconds()
    if s < 120:
        return "%d s ago" % max(s, 0)
    if s < 7200:
        return "%d min ago" % (s // 60)
    if s < 2 * 86400:
        return "%d h ago" % (s // 3600)
    return "%d d ago" % (s // 86400)


FRESHNESS = (("within 15 min", 900), ("within 1 h", 3600), ("within 24 h", 86400))
# the ingest's rate: readings stored (``reading.stored_at``, the database's clock) per
# second over each window
RATE_WINDOWS = (("last minute", 60), ("last 5 min", 300), ("last hour", 3600))
# what the overview raises as an alert when the ingest saw it within the last hour: a
# signature that does not verify, an unknown key, a replayed or forked chain, a batch
# that does not parse, one the database refused (the dead letters); the Prometheus rules
# (deploy/prometheus/cityedge-alerts.yml) raise the same from the fleet's metrics
ALERT_STATUSES = (chain.BAD_SIGNATURE, chain.UNKNOWN_KEY, chain.REPLAY, chain.FORK,
                  chain.MALFORMED, DEAD_LETTER)
ALERT_WINDOW_S = 3600


def ingest_rates(session: Session, now: dt.datetime) -> list[tuple[str, float]]:
    """Readings stored per second over each of ``RATE_WINDOWS`` (one index range each)."""
    rates = []
    for label, seconds in RATE_WINDOWS:
        n = session.execute(sa_select(func.count()).select_from(Reading).where(
            col(Reading.stored_at) >= now - dt.timedelta(seconds=seconds))).scalar_one()
        rates.append((label, int(n) / seconds))
    return rates


def alerts(session: Session, now: dt.datetime, by_state: dict[str, int],
           keys: dict[str, int] | None) -> list[str]:
    """What needs a person now, each as one sentence (empty: nothing)."""
    found = []
    since = now - dt.timedelta(seconds=ALERT_WINDOW_S)
    for status, n, devices in session.execute(
            sa_select(col(IngestEvent.status), func.count(),
                      func.count(col(IngestEvent.device_id).distinct()))
            .where(col(IngestEvent.at) >= since,
                   col(IngestEvent.status).in_(ALERT_STATUSES))
            .group_by(IngestEvent.status).order_by(IngestEvent.status)):
        found.append("%d %s in the last hour, from %d device(s)" % (
            n, status.replace("_", " "), devices))
    if by_state.get(DeviceState.quarantined.value):
        found.append("%d device(s) quarantined" % by_state[DeviceState.quarantined.value])
    for status in ("expired", "overdue"):
        if keys and keys.get(status):
            found.append("%d device key(s) %s" % (keys[status], status))
    return found


@router.get("/", response_class=HTMLResponse)
def overview(visit: Overview, session: SessionDep) -> HTMLResponse:
    now = utcnow()
    by_state = {str(k): n for k, n in session.exec(
        select(Device.state, func.count()).group_by(Device.state)).all()}
    total = sum(by_state.values())
    sites: dict[str, dict[str, int]] = defaultdict(dict)
    for site, state, n in session.exec(select(Device.site, Device.state, func.count())
                                       .group_by(Device.site, Device.state)):
        sites[site][str(state)] = n
    busiest = sorted(sites.items(), key=lambda kv: -sum(kv[1].values()))[:SITES_MAX]
    cols = [case((col(Device.last_seen) >= now - dt.timedelta(seconds=s), 1), else_=0)
            for _, s in FRESHNESS]
    live = col(Device.state).in_((DeviceState.active, DeviceState.quarantined,
                                  DeviceState.provisioned))
    row = session.execute(sa_select(*[func.coalesce(func.sum(c), 0) for c in cols],
                                    func.count(col(Device.last_seen)), func.count())
                          .where(live)).one()
    fresh = [(label, int(n)) for (label, _), n in zip(FRESHNESS, row[:3], strict=True)]
    fresh.append(("longer ago", int(row[3]) - int(row[2])))
    fresh.append(("never", int(row[4]) - int(row[3])))
    quarantined = session.exec(select(Device).where(Device.state == DeviceState.quarantined)
                               .order_by(col(Device.id)).limit(EVENTS_MAX)).all()
    days = []
    for back in range(7):
        start = (now - dt.timedelta(days=back)).replace(hour=0, minute=0, second=0,
                                                         microsecond=0)
        end = start + dt.timedelta(days=1)
        counts = dict(session.exec(select(IngestEvent.status, func.count()).where(
            col(IngestEvent.at) >= start, col(IngestEvent.at) < end)
            .group_by(IngestEvent.status)).all())
        days.append((start.date().isoformat(), counts))
    kinds = sorted({k for _, c in days for k in c})
    keys = None
    key_api = access.KEY_REPORT
    if visit.may(key_api):
        keys = renewal.key_report(session)["summary"]
    return render("overview.html", visit=visit, by_state=by_state, total=total,
                  states=[s.value for s in DeviceState], sites=busiest, fresh=fresh,
                  quarantined=quarantined, days=days, kinds=kinds, keys=keys,
                  key_api=key_api, api=access.DEVICES, age=age,
                  rates=ingest_rates(session, now),
                  alerts=alerts(session, now, by_state, keys))


@router.get("/devices", response_class=HTMLResponse)
def devices(visit: Devices, session: SessionDep, q: Text = None,
            state: DeviceState | None = None, site: Text = None, model: Text = None,
            after: Annotated[str | None, Query(max_length=128)] = None) -> HTMLResponse:
    """One keyset page: the same query as ``GET /devices`` (plus the search box)."""
    page = visit.request.app.state.settings.limits.console_page
    rows, next_after = registry.list_devices(
        session, limit=page, after=after or None, state=state, site=site or None,
        model=model or None, search=q or None)
    filters = {"q": q or "", "state": state.value if state else "", "site": site or "",
               "model": model or ""}
    api_query = "&".join("%s=%s" % (k, v) for k, v in filters.items() if v and k != "q")
    return render("devices.html", visit=visit, rows=rows, next_after=next_after,
                  filters=filters, states=[s.value for s in DeviceState], age=age,
                  api=access.DEVICES, api_query=api_query, now=utcnow())


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(visit: Devices, session: SessionDep,
           device_id: Annotated[str, Path(max_length=128)]) -> HTMLResponse:
    found = session.get(Device, device_id)
    if found is None:
        raise ConsoleRefusal(404, "no device %s" % device_id)
    public = registry.to_public(session, [found])[0]
    now = utcnow()
    creds = registry.credentials_of(session, device_id)
    chain = session.get(ChainStateRow, device_id)
    newest = session.exec(select(Reading).where(Reading.device_id == device_id)
                          .order_by(col(Reading.t).desc(), col(Reading.id).desc())
                          .limit(READINGS_MAX)).all()
    series: dict[str, list[tuple[float, float]]] = {}
    units: dict[str, str | None] = {}
    for r in reversed(newest):
        if r.value is None:
            continue
        if r.name not in series and len(series) >= SERIES_MAX:
            continue
        series.setdefault(r.name, []).append((r.t, r.value))
        units[r.name] = r.unit
    charts = [(name, line_chart(name, units[name], pts), pts[-1][1])
              for name, pts in series.items()]
    events = session.exec(select(IngestEvent).where(IngestEvent.device_id == device_id)
                          .order_by(col(IngestEvent.id).desc()).limit(EVENTS_MAX)).all()
    commands = [command_queue.to_public(c) for c in
                command_queue.of_device(session, device_id, limit=EVENTS_MAX)]
    return render("device.html", visit=visit, d=public, creds=creds, chain=chain,
                  charts=charts, readings=len(newest), events=events, commands=commands,
                  now=now, age=age, apis={
                      "device": access.DEVICE, "credentials": access.CREDENTIALS,
                      "readings": access.READINGS, "events": access.EVENTS,
                      "commands": access.COMMANDS})


def waves_of(devices: list[dict[str, Any]]) -> list[tuple[int, dict[str, int], int]]:
    """Per wave (in order): its members by status, and its size."""
    waves: dict[int, dict[str, int]] = defaultdict(dict)
    for d in devices:
        if d["wave"] is None:
            continue
        counts = waves[d["wave"]]
        counts[d["status"]] = counts.get(d["status"], 0) + 1
    return [(w, c, sum(c.values())) for w, c in sorted(waves.items())]


@router.get("/campaigns", response_class=HTMLResponse)
def campaigns(visit: Campaigns, session: SessionDep) -> HTMLResponse:
    rotation = ota = None
    if visit.may(access.ROTATION_CAMPAIGNS):
        rotation = [campaign_store.status(session, c.id or 0)
                    for c in campaign_store.campaigns(session, limit=EVENTS_MAX)]
    if visit.may(access.OTA_CAMPAIGNS):
        ota = [ota_store.status(session, c.id or 0)
               for c in ota_store.campaigns(session, limit=EVENTS_MAX)]
    return render("campaigns.html", visit=visit, rotation=rotation, ota=ota,
                  apis={"rotation": access.ROTATION_CAMPAIGNS, "ota": access.OTA_CAMPAIGNS})


def campaign_status(session: Session, kind: str, campaign_id: int) -> dict[str, Any]:
    try:
        if kind == "rotation":
            return campaign_store.status(session, campaign_id, devices=True)
        return ota_store.status(session, campaign_id, devices=True)
    except (CampaignError, ota_store.OtaError) as e:
        raise ConsoleRefusal(404, str(e)) from e


@router.get("/campaigns/{kind}/{campaign_id}", response_class=HTMLResponse)
def campaign(visit: Campaigns, session: SessionDep,
             kind: Annotated[str, Path(pattern="^(rotation|ota)$")],
             campaign_id: Annotated[int, Path(ge=1, le=ID_MAX)],
             done: Annotated[str | None, Query(max_length=16)] = None) -> HTMLResponse:
    api = access.ROTATION_CAMPAIGN if kind == "rotation" else access.OTA_CAMPAIGN
    require(visit.request, session, visit.who, api, "read %s campaigns" % kind)
    got = campaign_status(session, kind, campaign_id)
    actions = [(a, access.campaign_action(kind, a)) for a in access.CAMPAIGN_ACTIONS]
    return render("campaign.html", visit=visit, kind=kind, c=got,
                  waves=waves_of(got.get("devices") or []), api=api,
                  actions=[(a, x) for a, x in actions if visit.may(x)],
                  done=done if done in access.CAMPAIGN_ACTIONS else None)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(visit: Audit, session: SessionDep,
               before: Annotated[int | None, Query(ge=1, le=ID_MAX)] = None) -> HTMLResponse:
    result = audit.verify(session)
    query = select(AuditRecord).order_by(col(AuditRecord.id).desc()).limit(AUDIT_PAGE)
    if before is not None:
        query = query.where(col(AuditRecord.id) < before)
    rows = session.exec(query).all()
    older = rows[-1].id if len(rows) == AUDIT_PAGE else None
    return render("audit.html", visit=visit, result=result, rows=rows, older=older,
                  apis={"verify": access.AUDIT_VERIFY, "list": access.AUDIT})


@router.get("/enrollment", response_class=HTMLResponse)
def enrollment(visit: Enrollment) -> HTMLResponse:
    lim = visit.request.app.state.settings.limits
    return render("enrollment.html", visit=visit, api=access.ENROLLMENT_TOKEN, issued=None,
                  error=None, ttl_default=lim.enroll_token_ttl_s // 60,
                  ttl_max=lim.enroll_token_max_ttl_s // 60)


@router.get("/hardware", response_class=HTMLResponse)
def hardware(visit: Hardware, session: SessionDep) -> HTMLResponse:
    rows = list_reports(session, vendor=hw_access.vendor_scope(visit.who), model=None,
                        profile=None, after=None, limit=AUDIT_PAGE)
    return render("hardware.html", visit=visit, rows=rows, api=access.HW_REPORTS)
