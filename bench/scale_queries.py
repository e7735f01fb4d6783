"""The API's list endpoints at city scale: 1,000,000 devices and 100 million readings.

One throwaway PostgreSQL (``tests/support/pg.py``), schema made by the project's
migrations, filled server-side (``INSERT ... SELECT generate_series``): devices spread
over 100 sites, 3 states and 10 models, each with a tag and a chain state; readings spread
evenly over the devices and over ``DAYS`` daily partitions (``reading_p<YYYYMMDD>``, the
last ``DAYS`` days; each partition is filled as a plain table, indexed, then attached, as
a bulk load would be); an audit log with as many rows as devices. Then every list
endpoint an operator uses is asked through the real FastAPI app and its auth (a bearer
token; a console session; open data without a token), in process (``TestClient``: the
server's time, no network). Each query: ``RUNS`` runs of ``REQUESTS`` requests, p50/p99 of
each run in milliseconds, the median over the runs reported. The same is measured in the
same run at a baseline size, and the report gives the ratio big / baseline.

Every SQL statement a query's request runs is ``EXPLAIN``ed at the big size; a plan that
reads a big table (devices, tags, chain states, audit, readings) with a sequential scan
is reported as not indexed.

``python -m bench.scale_queries`` runs the full size; ``--quick`` a smoke size;
``--devices``/``--readings`` any other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.fleet import _engine, _settings  # noqa: E402
from bench.machine import p50_p99  # noqa: E402
from cityedge_fleet import reading_partitions  # noqa: E402
from cityedge_fleet.ca import init_ca  # noqa: E402
from cityedge_fleet.config import OpenDataKind, OpenDataSite, Settings  # noqa: E402
from cityedge_fleet.models import Role  # noqa: E402


@dataclass(frozen=True)
class Size:
    devices: int
    readings: int


FULL = Size(1_000_000, 100_000_000)
BASELINE = Size(10_000, 1_000_000)
QUICK = Size(3_000, 60_000)
QUICK_BASELINE = Size(1_000, 20_000)
DAYS = 10  # daily partitions the readings are spread over (the last DAYS days)
SITES = 100
MODELS = 10
STATES = ("active", "provisioned", "quarantined")
PAGE = 100  # rows asked for in each API page
CONSOLE_PAGE = 50  # FleetLimits.console_page
RUNS = 5
REQUESTS = 20  # per run and query
WARMUP = 3
PUBLIC_SITE = "site-042"  # the site open data publishes
KINDS = ("temp", "pm25")  # the readings' names, alternating per device and round
TAGS = 50
# a sequential scan of a table (or partition) holding more rows than this is a finding
SEQ_SCAN_ROWS_MAX = 10_000
# rows a plan may read (returned + filtered away) for one page and still count as an index
# range: a page of 100 plus the 1 % of a day's readings a site filter keeps (10,000 rows
# read for 100 kept) and the device look-ups of those, with room
ROWS_READ_MAX = 50_000
SLOW_TIMEOUT_S = 120.0  # the untimed (known table walk) query: cut after this


def device_id(i: int) -> str:
    return "urn:dev:mac:%012x" % i


# ------------------------------------------------------------------------------ filling


def _fill_devices(conn: Any, n: int) -> None:
    conn.execute(
        "INSERT INTO device (id, serial, model, hardware_class, site, firmware_version, "
        "state, forgeries, created_at, malformed) "
        "SELECT 'urn:dev:mac:' || lpad(to_hex(i), 12, '0'), 'SN' || lpad(i::text, 9, '0'), "
        "'model-' || (i %% %d), (ARRAY['esp32','rp2','rpi'])[i %% 3 + 1], "
        "'site-' || lpad((i %% %d)::text, 3, '0'), '1.' || (i %% 7), "
        "(ARRAY['active','provisioned','quarantined'])[i %% 3 + 1], 0, now(), 0 "
        "FROM generate_series(0, %d) i" % (MODELS, SITES, n - 1))
    conn.execute("INSERT INTO device_tag (device_id, tag) SELECT 'urn:dev:mac:' || "
                 "lpad(to_hex(i), 12, '0'), 'tag-' || (i %% %d) FROM generate_series(0, %d) i"
                 % (TAGS, n - 1))
    conn.execute("INSERT INTO chain_state (device_id, state, last_seq, missing, forgotten) "
                 "SELECT id, '\\x00'::bytea, 0, 0, 0 FROM device")


def _fill_audit(conn: Any, n: int) -> None:
    conn.execute(
        "INSERT INTO audit_record (id, at, actor, action, target, source, outcome, detail, "
        "prev_hash, hash, alg) SELECT i, to_char(now() - make_interval(secs => %d - i), "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), 'ops', 'device.update', "
        "'urn:dev:mac:' || lpad(to_hex(i %% %d), 12, '0'), '127.0.0.1', 'ok', '{}', "
        "md5((i - 1)::text) || md5((i - 1)::text || 'x'), md5(i::text) || md5(i::text || 'x'), "
        "'sha256' FROM generate_series(1, %d) i" % (n, n, n))
    conn.execute("SELECT setval('audit_record_id_seq', %d)" % n)


def _days(now: dt.datetime) -> list[dt.datetime]:
    today = reading_partitions.period_start(now, "day")
    return [today - dt.timedelta(days=DAYS - k) for k in range(DAYS)]


def _fill_readings(conn: Any, size: Size, now: dt.datetime) -> None:
    """``size.readings`` rows over the last ``DAYS`` days: in each day, in time order
    (the heap as the ingest writes it), every device in turn; the names alternate."""
    conn.execute("ALTER TABLE reading DETACH PARTITION %s" % reading_partitions.LEGACY_PARTITION)
    conn.execute("DROP TABLE %s" % reading_partitions.LEGACY_PARTITION)
    per_day = size.readings // DAYS
    n = size.devices
    for k, start in enumerate(_days(now)):
        name = reading_partitions.partition_name(start)
        t0 = start.timestamp()
        first = k * per_day
        conn.execute("CREATE TABLE %s (LIKE reading INCLUDING DEFAULTS)" % name)
        conn.execute(
            "INSERT INTO %s (id, device_id, t, name, unit, value, batch_seq, status, "
            "timebase, stored_at) SELECT %d + j + 1, 'urn:dev:mac:' || lpad(to_hex(j %% %d), "
            "12, '0'), %r + j * %r, (ARRAY['temp','pm25'])[(j / %d) %% 2 + 1], 'Cel', "
            "(j %% 400) / 10.0, %d + j / %d, 'ok', 0, to_timestamp(%r + j * %r) "
            "FROM generate_series(0, %d) j"
            % (name, first, n, t0, 86_000.0 / per_day, n, k * (per_day // n + 1), n, t0,
               86_000.0 / per_day, per_day - 1))
        conn.execute("ALTER TABLE %s ADD PRIMARY KEY (id, stored_at)" % name)
        conn.execute("CREATE INDEX ON %s (device_id, t)" % name)
        conn.execute("CREATE INDEX ON %s (t)" % name)  # migration 0015
        conn.execute("ALTER TABLE reading ATTACH PARTITION %s FOR VALUES FROM ('%s') TO ('%s')"
                     % (name, start.isoformat(), (start + dt.timedelta(days=1)).isoformat()))
        conn.commit()
    conn.execute("SELECT setval('reading_id_seq', %d)" % (per_day * DAYS))
    conn.commit()


def _fill_streams(conn: Any) -> None:
    """The ``reading_stream`` rows the ingest would have written for these readings (the
    same grouped scan as migration 0016's)."""
    conn.execute("INSERT INTO reading_stream (device_id, name, status) SELECT DISTINCT "
                 "device_id, name, status FROM reading WHERE value IS NOT NULL AND "
                 "timebase = 0 AND t >= 0 AND t <= 253402300799")


def fill(url: str, size: Size, now: dt.datetime) -> dict[str, float]:
    """Fill the migrated database at ``url``; seconds per part."""
    import psycopg

    took: dict[str, float] = {}
    with psycopg.connect(url) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET synchronous_commit = off")
        for part, fn in (("devices", lambda: _fill_devices(conn, size.devices)),
                         ("audit", lambda: _fill_audit(conn, size.devices)),
                         ("readings", lambda: _fill_readings(conn, size, now)),
                         ("streams", lambda: _fill_streams(conn))):
            t = time.perf_counter()
            fn()
            conn.commit()
            took[part] = time.perf_counter() - t
        # the ingest's own partition of today (and the coming days: the migration's)
        t = time.perf_counter()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")  # what autovacuum would have done meanwhile
        took["vacuum_analyze"] = time.perf_counter() - t
    return took


# ------------------------------------------------------------------------------ queries


@dataclass(frozen=True)
class Query:
    name: str
    path: str
    auth: str  # "token", "console" or "public"
    expect: int  # rows the answer holds
    rows: str  # how to count them: "data", "list", "value", "console"
    timed: bool = True  # False: a known table walk, run once (``measure``)
    index: str = ""  # an index the plan is also shown without (dropped, rolled back)


def queries(size: Size, now: dt.datetime, datastream: str, sta: str) -> list[Query]:
    n = size.devices
    per_site = len(range(42, n, SITES))
    quarantined = len(range(2, n, 3))
    # site 42 and state active (i % 3 == 0): i = 42 + 100 k with k % 3 == 0
    site_active = len([i for i in range(42, n, SITES) if i % 3 == 0])
    one = device_id(n // 2 + 7)
    last_day = size.readings // DAYS // n  # readings of one device on one day
    per_device = last_day * DAYS
    temps = (last_day + 1) // 2 * DAYS  # its "temp" readings (rounds alternate the name)
    day = reading_partitions.period_start(now, "day") - dt.timedelta(days=1)
    since = quote(day.isoformat())
    until = quote((day + dt.timedelta(days=1)).isoformat())
    audit_n = n
    site_day = per_site * last_day  # published rows of the public site on one day
    lo, hi = day.strftime("%Y-%m-%dT%H:%M:%SZ"), (day + dt.timedelta(days=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    return [
        Query("devices: first page", "/devices?limit=%d" % PAGE, "token", PAGE, "data"),
        Query("devices: site", "/devices?limit=%d&site=site-042" % PAGE, "token",
              min(PAGE, per_site), "data"),
        Query("devices: state", "/devices?limit=%d&state=quarantined" % PAGE, "token",
              min(PAGE, quarantined), "data"),
        Query("devices: state + site", "/devices?limit=%d&state=active&site=site-042" % PAGE,
              "token", min(PAGE, site_active), "data"),
        Query("devices: tag", "/devices?limit=%d&tag=tag-7" % PAGE, "token",
              min(PAGE, len(range(7, n, TAGS))), "data"),
        Query("devices: deep page (after=, middle)", "/devices?limit=%d&after=%s"
              % (PAGE, device_id(n // 2)), "token", PAGE, "data"),
        Query("devices: last page (after=)", "/devices?limit=%d&after=%s"
              % (PAGE, device_id(n - 51)), "token", 50, "data"),
        Query("device readings: first page", "/devices/%s/readings?limit=%d" % (one, PAGE),
              "token", min(PAGE, per_device), "list"),
        Query("device readings: newest day (since/until)",
              "/devices/%s/readings?limit=%d&since=%s&until=%s" % (one, PAGE, since, until),
              "token", min(PAGE, last_day), "list"),
        Query("audit: first page", "/audit?limit=%d" % PAGE, "token", PAGE, "list"),
        Query("audit: deep page (after=, middle)", "/audit?limit=%d&after=%d"
              % (PAGE, audit_n // 2), "token", PAGE, "list"),
        Query("console: devices first page", "/console/devices", "console", CONSOLE_PAGE,
              "console"),
        Query("console: devices site + state", "/console/devices?site=site-042&state=active",
              "console", min(CONSOLE_PAGE, site_active), "console"),
        Query("console: devices deep page", "/console/devices?after=%s" % device_id(n // 2),
              "console", CONSOLE_PAGE, "console"),
        Query("STA: Observations of a Datastream", "%s/Datastreams('%s')/Observations"
              "?$top=%d" % (sta, datastream, PAGE), "public", min(PAGE, temps),
              "value"),
        Query("STA: Observations of a Datastream, newest first",
              "%s/Datastreams('%s')/Observations?$top=%d&$orderby=phenomenonTime%%20desc"
              % (sta, datastream, PAGE), "public", min(PAGE, temps), "value"),
        Query("STA: Observations of the open site over a day",
              "%s/Observations?$top=%d&$orderby=phenomenonTime&$filter=phenomenonTime%%20ge"
              "%%20%s%%20and%%20phenomenonTime%%20lt%%20%s" % (sta, PAGE, lo, hi), "public",
              min(PAGE, site_day), "value", index="ix_reading_t"),
        # the same in the default order (by id): the primary key walked from the first
        # partition, every row before the day read and dropped
        Query("STA: the same, default order (by id)",
              "%s/Observations?$top=%d&$filter=phenomenonTime%%20ge%%20%s%%20and%%20"
              "phenomenonTime%%20lt%%20%s" % (sta, PAGE, lo, hi), "public",
              min(PAGE, site_day), "value", timed=False),
    ]


def _rows(q: Query, r: Any) -> int:
    if q.rows == "data":
        return len(r.json()["data"])
    if q.rows == "value":
        return len(r.json()["value"])
    if q.rows == "console":
        return r.text.count('<td><a href="/console/devices/')
    return len(r.json())


@contextmanager
def _statements(engine: Any) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements the engine runs meanwhile (with their parameters)."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every scan node of a JSON plan."""
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", ()):
        yield from _scans(child)


def explain(url: str, statements: list[tuple[str, Any]], timeout_s: float = 600.0,
            without: str = "") -> dict[str, Any]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of each statement: its scans, the rows they read
    (returned and removed by filters, over all loops), shared buffers touched, execution
    time; a plan is ``indexed`` when it reads no table of more than ``SEQ_SCAN_ROWS_MAX``
    rows sequentially (an empty partition's seq scan is no finding) and reads at most
    ``ROWS_READ_MAX`` rows. ``timeout_s``: a statement still running then is cut
    (``timed_out``). ``without``: an index dropped first in the same transaction, which
    is rolled back (the plan as it was before the migration that made it)."""
    import psycopg

    scans: list[str] = []
    seq: list[str] = []
    rows_read = buffers = 0
    ms = 0.0
    timed_out = False
    with psycopg.connect(url) as conn:
        sizes = dict(conn.execute("SELECT relname, reltuples FROM pg_class "
                                  "WHERE relkind IN ('r', 'p')").fetchall())
        conn.execute("SET statement_timeout = %d" % int(timeout_s * 1000))
        if without:
            conn.execute("DROP INDEX %s" % without)
        for statement, params in statements:
            try:
                row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement,
                                   params).fetchone()
            except psycopg.errors.QueryCanceled:
                conn.rollback()
                timed_out = True
                ms += timeout_s * 1000
                continue
            assert row is not None
            top = row[0][0]
            ms += top["Execution Time"]
            buffers += (top["Plan"].get("Shared Hit Blocks", 0)
                        + top["Plan"].get("Shared Read Blocks", 0))
            for node in _scans(top["Plan"]):
                rel = node["Relation Name"]
                loops = node.get("Actual Loops", 1)
                rows_read += int(node.get("Actual Rows", 0) * loops
                                 + node.get("Rows Removed by Filter", 0)
                                 + node.get("Rows Removed by Index Recheck", 0))
                index = node.get("Index Name", "")
                text = "%s on %s%s" % (node["Node Type"], rel,
                                       " using %s" % index if index else "")
                if text not in scans:
                    scans.append(text)
                if node["Node Type"] == "Seq Scan" and sizes.get(rel, 0) > SEQ_SCAN_ROWS_MAX:
                    seq.append(text)
        conn.rollback()
    return {"scans": scans, "seq_scans_of_big_tables": seq, "rows_read": rows_read,
            "shared_buffers": buffers, "execution_ms": ms, "timed_out": timed_out,
            "indexed": not seq and not timed_out and rows_read <= ROWS_READ_MAX}


def _app_settings(url: str, base: Path) -> Settings:
    secret = base / "opendata.secret"
    if not secret.exists():
        secret.write_bytes(b"s" * 32)
        secret.chmod(0o600)
    s = _settings(url, base / "ca",
                  opendata_secret_file=secret,
                  opendata_sites={PUBLIC_SITE: OpenDataSite(name="Harbour", latitude=59.3,
                                                            longitude=18.0)},
                  opendata_kinds={k: OpenDataKind(name=k, unit_name="degree Celsius",
                                                  unit_symbol="Cel") for k in KINDS})
    # the open-data rate limit and catalogue lifetime are not what is measured here
    limits = s.limits.model_copy(update={"sta_burst": 1_000_000, "sta_per_s": 1_000_000.0,
                                         "sta_index_ttl_s": 86_400.0})
    return s.model_copy(update={"limits": limits})


def _once(client: Any, url: str, q: Query, kw: dict[str, Any], engine: Any,
          slow_sql: dict[str, list[tuple[str, Any]]]) -> dict[str, Any]:
    """A query known to walk the table: at the first size one request through the app
    (its SQL kept); at the next sizes that SQL under ``EXPLAIN ANALYZE`` with a timeout
    (a request would hold the app for minutes)."""
    if q.name not in slow_sql:
        with _statements(engine) as seen:
            t = time.perf_counter()
            r = client.get(q.path, **kw)
            ms = (time.perf_counter() - t) * 1000
        slow_sql[q.name] = list(seen)
        return {"path": q.path, "rows": _rows(q, r), "expected_rows": q.expect,
                "once_ms": ms, "statements": len(seen),
                "plan": explain(url, seen, SLOW_TIMEOUT_S)}
    plan = explain(url, slow_sql[q.name], SLOW_TIMEOUT_S)
    return {"path": q.path, "rows": None, "expected_rows": q.expect,
            "once_ms": None, "statements": len(slow_sql[q.name]), "plan": plan}


def measure(url: str, base: Path, size: Size, now: dt.datetime, *, runs: int,
            requests: int, slow_sql: dict[str, list[tuple[str, Any]]]
            ) -> dict[str, Any]:
    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from cityedge_fleet.app import create_app
    from cityedge_fleet.auth import create_api_token
    from cityedge_fleet.opendata.catalogue import PublicIds
    from cityedge_fleet.opendata.routes import STA_PREFIX
    from cityedge_fleet.serve import freeze_startup_objects

    from support.console import ConsoleClient

    settings = _app_settings(url, base)
    app = create_app(settings, init_db=False)
    out: dict[str, Any] = {"devices": size.devices, "readings": size.readings,
                           "queries": {}}
    with TestClient(app, base_url="https://testserver") as client:
        freeze_startup_objects()
        engine = app.state.engine
        with Session(engine) as s:
            _, tok = create_api_token(s, name="bench", role=Role.admin, created_by="bench")
            s.commit()
        ConsoleClient(client).sign_in(tok)
        headers = {"Authorization": "Bearer %s" % tok}
        public = [i for i in range(42, size.devices, SITES) if i % 3 != 1][:1]
        stream = PublicIds(settings.opendata_secret_file.read_bytes()  # type: ignore[union-attr]
                           ).datastream(device_id(public[0]), "temp")
        t = time.perf_counter()
        first = client.get(STA_PREFIX + "/Datastreams")
        out["sta_catalogue_build_ms"] = (time.perf_counter() - t) * 1000
        if first.status_code != 200:
            raise SystemExit("bench: STA Datastreams -> %d" % first.status_code)
        for q in queries(size, now, stream, STA_PREFIX):
            kw = {"headers": headers} if q.auth == "token" else {}
            if not q.timed:
                out["queries"][q.name] = _once(client, url, q, kw, engine, slow_sql)
                continue
            for _ in range(WARMUP):
                client.get(q.path, **kw)
            with _statements(engine) as seen:
                r = client.get(q.path, **kw)
            if r.status_code != 200:
                raise SystemExit("bench: %s -> %d %s" % (q.path, r.status_code, r.text[:300]))
            p50s: list[float] = []
            p99s: list[float] = []
            for _ in range(runs):
                times = []
                for _ in range(requests):
                    t = time.perf_counter()
                    r = client.get(q.path, **kw)
                    times.append((time.perf_counter() - t) * 1000)
                    if r.status_code != 200:
                        raise SystemExit("bench: %s -> %d" % (q.path, r.status_code))
                p50, p99 = p50_p99(times)
                p50s.append(p50)
                p99s.append(p99)
            entry: dict[str, Any] = {
                "path": q.path, "rows": _rows(q, r), "expected_rows": q.expect,
                "p50_ms": statistics.median(p50s), "p99_ms": statistics.median(p99s),
                "statements": len(seen)}
            entry["plan"] = explain(url, seen)
            if q.index:
                entry["plan_without_" + q.index] = explain(url, seen, SLOW_TIMEOUT_S,
                                                           without=q.index)
            out["queries"][q.name] = entry
    engine.dispose()
    gc.unfreeze()
    return out


def _tune(cluster: Any) -> None:
    """Settings a bulk load and a database of this size want; the server restarts."""
    import psycopg

    with psycopg.connect(cluster.admin_url(), autocommit=True) as conn:
        for name, value in (("shared_buffers", "1GB"), ("max_wal_size", "16GB"),
                            ("checkpoint_timeout", "30min"), ("wal_level", "minimal"),
                            ("max_wal_senders", "0")):
            conn.execute("ALTER SYSTEM SET %s = '%s'" % (name, value))
    cluster.stop()
    cluster.start()


def run(big: Size = FULL, baseline: Size = BASELINE, *, runs: int = RUNS,
        requests: int = REQUESTS) -> dict[str, Any]:
    from support.pg import pg_cluster

    now = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {"days": DAYS, "runs": runs, "requests_per_run": requests,
                               "page_rows": PAGE}
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-scale-") as d, \
            pg_cluster(fsync=True) as pg:
        base = Path(d)
        base.chmod(0o755)
        init_ca(base / "root", base / "ca")
        _tune(pg)
        slow_sql: dict[str, list[tuple[str, Any]]] = {}
        for label, size in (("baseline", baseline), ("big", big)):
            url = pg.new_database()
            _engine(_settings(url, base / "ca")).dispose()  # the migrations make the schema
            t = time.perf_counter()
            fill_s = fill(url, size, now)
            fill_s["total"] = time.perf_counter() - t
            r = measure(url, base, size, now, runs=runs, requests=requests,
                        slow_sql=slow_sql)
            r["fill_s"] = fill_s
            r["database_bytes"] = _database_bytes(url)
            results[label] = r
            print("bench scale_queries: %s (%d devices, %d readings) filled in %.0f s"
                  % (label, size.devices, size.readings, fill_s["total"]), file=sys.stderr)
    for name, q in results["big"]["queries"].items():
        b = results["baseline"]["queries"][name]
        q["ratio_rows_read"] = q["plan"]["rows_read"] / max(1, b["plan"]["rows_read"])
        if "p50_ms" not in q:
            continue
        q["ratio_p50"] = q["p50_ms"] / b["p50_ms"]
        q["ratio_p99"] = q["p99_ms"] / b["p99_ms"]
    return results


def _database_bytes(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def report(r: dict[str, Any]) -> None:
    b, g = r["baseline"], r["big"]
    print("\nList endpoints at %d devices / %d readings vs %d / %d (baseline, same run), "
          "%d daily partitions, ms (median over %d runs of %d requests of p50 / p99):"
          % (g["devices"], g["readings"], b["devices"], b["readings"], r["days"], r["runs"],
             r["requests_per_run"]))
    print("  %-44s %15s %15s %11s %4s %9s %s" % ("query", "baseline", "big", "ratio", "rows",
                                               "rows read", "plan"))
    for name, q in g["queries"].items():
        bq = b["queries"][name]
        plan = q["plan"]
        verdict = "index" if plan["indexed"] else "NOT AN INDEX RANGE: %s" % (
            ", ".join(plan["seq_scans_of_big_tables"]) or "%d rows read%s" % (
                plan["rows_read"], ", cut at %.0f s" % SLOW_TIMEOUT_S
                if plan["timed_out"] else ""))
        if "p50_ms" in q:
            print("  %-44s %6.1f / %6.1f %6.1f / %6.1f %5.2f/%5.2f %4d %9d %s" % (
                name, bq["p50_ms"], bq["p99_ms"], q["p50_ms"], q["p99_ms"], q["ratio_p50"],
                q["ratio_p99"], q["rows"], plan["rows_read"], verdict))
        else:
            print("  %-44s %15s %15s %11s %4s %9d %s" % (
                name, "%.0f once" % bq["plan"]["execution_ms"],
                "%.0f once" % plan["execution_ms"], "", "-", plan["rows_read"], verdict))
    for name, q in g["queries"].items():
        for key in (k for k in q if k.startswith("plan_without_")):
            print("  %s, plan without %s (dropped, rolled back): baseline %.1f ms, %d rows "
                  "read; big %.1f ms, %d rows read%s" % (
                      name, key.removeprefix("plan_without_"),
                      b["queries"][name][key]["execution_ms"],
                      b["queries"][name][key]["rows_read"], q[key]["execution_ms"],
                      q[key]["rows_read"], " (cut)" if q[key]["timed_out"] else ""))
    for label, x in (("baseline", b), ("big", g)):
        print("  %s: filled in %s s; database %.1f GB; STA catalogue built in %.0f ms"
              % (label, {k: round(v, 1) for k, v in x["fill_s"].items()},
                 x["database_bytes"] / 1e9, x["sta_catalogue_build_ms"]))


def main(argv: list[str] | None = None) -> None:
    from bench.machine import describe

    ap = argparse.ArgumentParser(prog="python -m bench.scale_queries")
    ap.add_argument("--quick", action="store_true", help="smoke size (seconds)")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--readings", type=int)
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args(argv)
    big, baseline = (QUICK, QUICK_BASELINE) if a.quick else (FULL, BASELINE)
    if a.devices or a.readings:
        big = Size(a.devices or big.devices, a.readings or big.readings)
    print("cityedge list-endpoint scale bench on %s" % describe())
    r = run(big, baseline, runs=2 if a.quick else RUNS)
    report(r)
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
