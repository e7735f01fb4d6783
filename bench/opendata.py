"""Open-data benchmark: a day of one Datastream through the SensorThings API against the
plain JSON API's readings query, in the same run, on SQLite and PostgreSQL.

A fleet of ``DEVICES`` devices at ``SITES`` sites (half of them public) each has a day of
readings at ``PERIOD_S`` (``DEVICES * 86400 / PERIOD_S`` rows in ``reading``, inserted in
bulk: this measures the queries, not the ingest). One public device's day is read:

- **SensorThings**: ``GET /sta/v1.1/Datastreams('<id>')/Observations`` with a
  ``phenomenonTime`` day filter, ``$orderby=phenomenonTime`` and ``$top=1000`` (and
  ``$top=500``), following ``@iot.nextLink`` to the end;
- **baseline**: ``GET /devices/<id>/readings?since=&until=&limit=500`` (its page maximum)
  with a viewer token, the next page's ``since`` just after the last reading's time.

Both through the ASGI app in process (``TestClient``, as the registry bench), after one
untimed pass each; the figure is the median of ``RUNS`` whole-day reads, with the p50 of
one page's time. The catalogue's build (registry + one grouped scan of ``reading``) is
timed apart, on the first open-data request.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session

from cityedge_fleet.ca import init_ca
from cityedge_fleet.config import FleetLimits, OpenDataKind, OpenDataSite, Settings
from cityedge_fleet.models import Device, DeviceState, Reading, ReadingStream, Role

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DEVICES = 8
SITES = 4  # site-0, site-2 public
PERIOD_S = 1.0  # seconds between one device's readings: 86,400 a day
DAY0 = 1_790_035_200.0  # 2026-09-22T00:00:00Z
RUNS = 5
CHUNK = 20_000


def _settings(url: str, ca_dir: Path, secret: Path) -> Settings:
    return Settings(
        mode="development", database_url=url, ca_dir=ca_dir, ingest_with_serve=False,
        audit_key_file=secret.parent / "audit.key", command_key_file=secret.parent / "cmd.key",
        opendata_secret_file=secret,
        opendata_sites={"site-%d" % s: OpenDataSite(name="Site %d" % s, latitude=60.1 + s,
                                                    longitude=24.9)
                        for s in range(0, SITES, 2)},
        opendata_kinds={"pm25": OpenDataKind(name="PM2.5", unit_name="ug/m3",
                                             unit_symbol="ug/m3")},
        limits=FleetLimits(sta_burst=10_000_000, sta_per_s=1e6))


def _fill(engine: Any, per_device: int) -> None:
    with Session(engine) as s:
        for i in range(DEVICES):
            s.add(Device(id="urn:dev:mac:0024beff%08x" % i, serial="OD-%d" % i, model="m",
                         hardware_class="esp32", site="site-%d" % (i % SITES),
                         state=DeviceState.active))
        s.commit()
        for i in range(DEVICES):
            dev = "urn:dev:mac:0024beff%08x" % i
            for start in range(0, per_device, CHUNK):
                s.execute(insert(Reading), [
                    {"device_id": dev, "t": DAY0 + k * PERIOD_S, "name": dev + ":pm25",
                     "unit": "ug/m3", "value": float(k % 97), "batch_seq": 1 + k // 50,
                     "status": "ok", "timebase": 0}
                    for k in range(start, min(per_device, start + CHUNK))])
            s.commit()
        # what the ingest writes beside the first such reading (``ReadingStream``)
        s.execute(insert(ReadingStream), [
            {"device_id": "urn:dev:mac:0024beff%08x" % i,
             "name": "urn:dev:mac:0024beff%08x:pm25" % i, "status": "ok"}
            for i in range(DEVICES)])
        s.commit()
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.connect() as c:
            c.exec_driver_sql("ANALYZE")


def _day_sta(client: Any, ds: str, top: int) -> tuple[float, list[float], int]:
    day = dt.datetime.fromtimestamp(DAY0, dt.UTC)
    flt = "phenomenonTime ge %s and phenomenonTime lt %s" % (
        day.isoformat().replace("+00:00", "Z"),
        (day + dt.timedelta(days=1)).isoformat().replace("+00:00", "Z"))
    url: str | None = "/sta/v1.1/Datastreams('%s')/Observations" % ds
    params: dict[str, str] | None = {"$filter": flt, "$orderby": "phenomenonTime",
                                     "$top": str(top)}
    pages: list[float] = []
    rows = 0
    t0 = time.perf_counter()
    while url is not None:
        t = time.perf_counter()
        r = client.get(url, params=params)
        pages.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise SystemExit("bench: %s -> %d %s" % (url, r.status_code, r.text[:200]))
        body = r.json()
        rows += len(body["value"])
        url = body.get("@iot.nextLink")
        if url is not None:
            url = url.removeprefix("http://testserver")
        params = None
    return (time.perf_counter() - t0) * 1000, pages, rows


def _day_json(client: Any, device: str, headers: dict[str, str]) -> tuple[float, list[float], int]:
    since = DAY0
    until = DAY0 + 86400
    pages: list[float] = []
    rows = 0
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        r = client.get("/devices/%s/readings" % device, headers=headers, params={
            "since": dt.datetime.fromtimestamp(since, dt.UTC).isoformat(),
            "until": dt.datetime.fromtimestamp(until, dt.UTC).isoformat(), "limit": 500})
        pages.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise SystemExit("bench: readings -> %d" % r.status_code)
        got = r.json()
        rows += len(got)
        if len(got) < 500:
            break
        since = got[-1]["t"] + 1e-6
    return (time.perf_counter() - t0) * 1000, pages, rows


def one(url: str, ca_dir: Path, secret: Path, per_device: int, runs: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from cityedge_fleet.app import create_app
    from cityedge_fleet.auth import create_api_token

    settings = _settings(url, ca_dir, secret)
    app = create_app(settings, init_db=True)
    out: dict[str, Any] = {}
    with TestClient(app) as client:
        engine = app.state.engine
        _fill(engine, per_device)
        with Session(engine) as s:
            _, tok = create_api_token(s, name="bench", role=Role.viewer, created_by="bench")
            s.commit()
        headers = {"Authorization": "Bearer %s" % tok}
        t = time.perf_counter()
        streams = client.get("/sta/v1.1/Datastreams", params={"$top": "1000"}).json()["value"]
        out["catalogue_build_ms"] = (time.perf_counter() - t) * 1000
        out["datastreams"] = len(streams)
        device = "urn:dev:mac:0024beff%08x" % 0  # site-0: public
        target = app.state.opendata.ids.datastream(device, "pm25")  # its public id
        assert any(d["@iot.id"] == target for d in streams)
        cases = {"sta_top1000": lambda: _day_sta(client, target, 1000),
                 "sta_top500": lambda: _day_sta(client, target, 500),
                 "json_limit500": lambda: _day_json(client, device, headers)}
        for fn in cases.values():
            fn()  # untimed: plans and caches, as on a running server
        totals: dict[str, list[float]] = {k: [] for k in cases}
        page_ms: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for name, fn in cases.items():  # interleaved
                total, pages, rows = fn()
                if rows != per_device:
                    raise SystemExit("bench: %s read %d of %d readings" % (name, rows,
                                                                          per_device))
                totals[name].append(total)
                page_ms[name].extend(pages)
        for name in cases:
            out[name] = {"day_ms": statistics.median(totals[name]),
                         "page_p50_ms": statistics.median(page_ms[name]),
                         "pages": len(page_ms[name]) // runs}
    app.state.engine.dispose()
    return out


def run(quick: bool = False) -> dict[str, Any]:
    from tests.support.pg import pg_cluster

    per_device = int(86400 / PERIOD_S) // (8 if quick else 1)
    runs = 1 if quick else RUNS
    results: dict[str, Any] = {"readings_per_device": per_device, "devices": DEVICES,
                               "runs": runs}
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-od-") as d, \
            pg_cluster(fsync=True) as cluster:
        base = Path(d)
        init_ca(base / "root", base / "ca")
        secret = base / "od.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
        results["sqlite"] = one("sqlite:///%s" % (base / "od.sqlite3"), base / "ca", secret,
                                per_device, runs)
        results["postgresql"] = one(str(cluster.new_database()), base / "ca", secret,
                                    per_device, runs)
    return results


def report(r: dict[str, Any]) -> None:
    print("\nOpen data: a day of one Datastream (%d readings; %d devices' days in the "
          "table), median of %d runs, ms:" % (r["readings_per_device"], r["devices"],
                                             r["runs"]))
    print("  %-44s %18s %18s" % ("query", "sqlite day / page", "postgresql day / page"))
    labels = {"sta_top1000": "SensorThings $top=1000 (nextLink)",
              "sta_top500": "SensorThings $top=500 (nextLink)",
              "json_limit500": "JSON API /devices/{id}/readings limit=500 (baseline)"}
    for key, label in labels.items():
        s, p = r["sqlite"][key], r["postgresql"][key]
        print("  %-44s %9.0f / %6.2f %9.0f / %6.2f  (%d pages)"
              % (label, s["day_ms"], s["page_p50_ms"], p["day_ms"], p["page_p50_ms"],
                 s["pages"]))
    print("  catalogue build (first request)             %9.0f %18.0f"
          % (r["sqlite"]["catalogue_build_ms"], r["postgresql"]["catalogue_build_ms"]))


if __name__ == "__main__":
    report(run(quick="--quick" in sys.argv))
