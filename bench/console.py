"""The web console's device list at 100,000 devices against the JSON API's, same run.

For each query (first page, a deep page, a site, a state, state + site, a search by id
prefix and by serial), requests alternate between ``GET /console/devices`` (a signed-in
session, 50 rows rendered to HTML) and ``GET /devices`` (a bearer token, ``limit=50``,
JSON), on SQLite and PostgreSQL, through the ASGI app in process (``TestClient``: the
server's time, no network). p50/p99 in milliseconds. ``python -m bench.console`` runs it
alone (``BENCH_DEVICES`` to change the fleet size).
"""

from __future__ import annotations

import gc
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import Databases, _bulk_devices, _settings
from bench.machine import p50_p99
from cityedge_fleet.ca import init_ca
from cityedge_fleet.models import Role

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DEVICES = 100_000
QUERIES = 100  # per query and side
WARMUP = 5  # untimed requests per query and side first
ROWS = 50  # a console page (FleetLimits.console_page); the API is asked for as many
TARGET_P99_MS = 100.0
ROW = re.compile(r'<td><a href="/console/devices/')


def _queries(n: int) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """name: (console query, API query): the same devices on both sides."""
    deep = "urn:dev:mac:%012x" % (n // 2)
    return {
        "first page": ({}, {}),
        "deep page (after=)": ({"after": deep}, {"after": deep}),
        "site": ({"site": "site-042"}, {"site": "site-042"}),
        "state": ({"state": "quarantined"}, {"state": "quarantined"}),
        "state+site": ({"state": "active", "site": "site-013"},
                       {"state": "active", "site": "site-013"}),
        "search id prefix": ({"q": "urn:dev:mac:0000000001"}, {}),
        "search serial": ({"q": "SN%09d" % (n - 7)}, {}),
    }


def _pct(times: list[float]) -> dict[str, float]:
    p50, p99 = p50_p99(times)
    return {"p50_ms": p50, "p99_ms": p99}


def latency(url: str, ca_dir: Path, n: int = DEVICES) -> dict[str, Any]:
    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from cityedge_fleet.app import create_app
    from cityedge_fleet.auth import create_api_token
    from cityedge_fleet.serve import freeze_startup_objects

    from support.console import ConsoleClient

    app = create_app(_settings(url, ca_dir), init_db=True)
    out: dict[str, Any] = {}
    with TestClient(app, base_url="https://testserver") as client:
        freeze_startup_objects()
        engine = app.state.engine
        _bulk_devices(engine, n)
        with Session(engine) as s:
            _, tok = create_api_token(s, name="bench", role=Role.viewer, created_by="bench")
            s.commit()
        ConsoleClient(client).sign_in(tok)
        headers = {"Authorization": "Bearer %s" % tok}
        for name, (cq, aq) in _queries(n).items():
            api_params = {**aq, "limit": str(ROWS)}
            for _ in range(WARMUP):
                client.get("/console/devices", params=cq)
                client.get("/devices", params=api_params, headers=headers)
            page: list[float] = []
            api: list[float] = []
            for _ in range(QUERIES):
                t = time.perf_counter()
                r = client.get("/console/devices", params=cq)
                page.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise SystemExit("bench: console %s -> %d" % (cq, r.status_code))
                t = time.perf_counter()
                a = client.get("/devices", params=api_params, headers=headers)
                api.append((time.perf_counter() - t) * 1000)
                if a.status_code != 200:
                    raise SystemExit("bench: GET /devices %s -> %d" % (aq, a.status_code))
            out[name] = {"console": _pct(page), "api": _pct(api),
                         "console_rows": len(ROW.findall(r.text)),
                         "api_rows": len(a.json()["data"])}
    app.state.engine.dispose()
    gc.unfreeze()
    return out


def run(n: int = DEVICES) -> dict[str, Any]:
    from tests.support.pg import pg_cluster

    results: dict[str, Any] = {"devices": n, "rows_per_page": ROWS}
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-console-") as d, \
            pg_cluster(fsync=True) as cluster:
        base = Path(d)
        base.chmod(0o755)
        init_ca(base / "root", base / "ca")
        dbs = Databases(base, cluster)
        for kind in ("sqlite", "postgresql"):
            results[kind] = latency(dbs.url(kind), base / "ca", n)
    return results


def report(r: dict[str, Any]) -> None:
    print("\nConsole device list (HTML, %d rows) vs GET /devices (JSON, limit=%d) at %d "
          "devices, ms (p50 / p99), requests alternated:" % (r["rows_per_page"],
                                                             r["rows_per_page"], r["devices"]))
    for kind in ("sqlite", "postgresql"):
        print("  %s" % kind)
        print("    %-22s %17s %17s %6s" % ("query", "console", "JSON API", "rows"))
        for name, q in r[kind].items():
            print("    %-22s %7.1f / %7.1f %7.1f / %7.1f %6d" % (
                name, q["console"]["p50_ms"], q["console"]["p99_ms"], q["api"]["p50_ms"],
                q["api"]["p99_ms"], q["console_rows"]))
    print("  target: console p99 < %.0f ms (the search rows have no JSON API twin: the "
          "API column is its plain first page)" % TARGET_P99_MS)


def main() -> None:
    from bench.machine import describe

    print("cityedge console bench on %s" % describe())
    r = run(int(os.environ.get("BENCH_DEVICES", DEVICES)))
    report(r)


if __name__ == "__main__":
    main()
