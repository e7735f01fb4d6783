"""Key rotation campaign benchmark (``make bench``; alone: ``python -m bench.campaign``).

**Wall time of a 1,000-device campaign, all online** (SQLite, the service's settings): a
campaign ``all`` in waves of 100 is created and run to ``done`` by the real campaign
runner; each round the due commands are delivered (the publisher's stand-in of
``tests/support/campaign_sim.py``: no broker) and the devices' answers — CSR proven by the
old key, ``ok`` results, the first batch under the new key, the erase — go through the
real ingest (CSR rules, CA signing, credential, install-cert and erase-key signed and
queued, the proof revoking the old certificate, the CRL re-signed). The clock runs from
the campaign's creation to ``done``; the time spent playing the devices (their key
generation, CSR, signatures: work real devices do in parallel) is measured apart, so the
fleet's share is shown too. Target: under 2 minutes.

**Baseline in the same run**: the raw CA, ``CertificateAuthority.sign_csr`` on 1,000 fresh
CSRs (no proof, no database, no command): the one step of a rotation no fleet can skip.
Median of ``RUNS``.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlmodel import Session

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.rotation import raw_issue_rate  # noqa: E402
from cityedge_fleet import campaign_store, command_key  # noqa: E402
from cityedge_fleet.ca import init_ca  # noqa: E402
from cityedge_fleet.campaign_runner import CampaignRunner  # noqa: E402
from cityedge_fleet.config import Settings  # noqa: E402
from cityedge_fleet.db import make_engine, migrate  # noqa: E402

from support.campaign_sim import SimFleet  # noqa: E402

RUNS = 3
DEVICES = 1000
WAVE = 100


def campaign_wall_time(base: Path, ca_dir: Path, n: int = DEVICES) -> dict[str, float]:
    settings = Settings(mode="development", database_url="sqlite:///%s" % (base / "f.sqlite3"),
                        ca_dir=ca_dir, ingest_with_serve=False,
                        command_key_file=base / "command.key", audit_key_file=base / "audit.key")
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    sim = SimFleet(engine, settings)
    sim.add_devices(n, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=70))
    run = CampaignRunner(engine, settings, command_key.from_settings(settings), renew=False)
    t = time.perf_counter()
    with Session(engine) as s:
        camp, _ = campaign_store.create(s, selector_text="all", wave_size=WAVE,
                                        max_failures="5%", by="bench", confirmed=True)
        s.commit()
        cid = camp.id or 0
    rounds = 0
    while True:
        rounds += 1
        out = run.round(renewal_due=False)
        sim.step()
        if out.campaigns.get(cid) == "done":
            break
        if rounds > 10 * n // WAVE + 50:
            raise RuntimeError("the campaign did not finish")
    wall = time.perf_counter() - t
    with Session(engine) as s:
        st = campaign_store.status(s, cid)
    engine.dispose()
    if st["counts"]["done"] != n:
        raise RuntimeError("only %d of %d devices rotated" % (st["counts"]["done"], n))
    return {"wall_s": wall, "devices_s": sim.device_s, "fleet_s": wall - sim.device_s,
            "rounds": float(rounds)}


def run(quick: bool = False) -> dict[str, Any]:
    runs = 1 if quick else RUNS
    n = DEVICES // 5 if quick else DEVICES
    walls: list[dict[str, float]] = []
    raw: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-camp-") as d:
        base = Path(d)
        init_ca(base / "root", base / "ca")
        for k in range(runs):
            raw.append(raw_issue_rate(base / "ca", n))
            work = base / ("w%d" % k)
            work.mkdir()
            walls.append(campaign_wall_time(work, base / "ca", n))
    raw_rate = statistics.median(raw)
    return {"devices": n, "runs": runs, "raw_issue_per_s": raw_rate,
            "raw_issue_s": n / raw_rate,
            **{"campaign_%s" % k: statistics.median(w[k] for w in walls)
               for k in ("wall_s", "devices_s", "fleet_s", "rounds")}}


def report(r: dict[str, Any]) -> None:
    print("\nKey rotation campaign, %d devices all online, waves of %d, SQLite, median of %d "
          "runs:" % (r["devices"], WAVE, r["runs"]))
    print("  raw CA sign_csr of as many certificates (baseline) %8.1f s (%.0f /s)"
          % (r["raw_issue_s"], r["raw_issue_per_s"]))
    print("  campaign created -> done, wall time                %8.1f s (target < 120 s; "
          "%d runner rounds)" % (r["campaign_wall_s"], r["campaign_rounds"]))
    print("    of which the fleet (runner, publisher stand-in, ingest) %5.1f s = %.1fx raw "
          "issuance" % (r["campaign_fleet_s"], r["campaign_fleet_s"] / r["raw_issue_s"]))
    print("    of which playing the devices (keys, CSRs, signatures)   %5.1f s"
          % r["campaign_devices_s"])


if __name__ == "__main__":
    report(run(quick="--quick" in sys.argv))
