"""OTA campaign benchmark (``make bench``; alone: ``python -m bench.ota``).

**Wall time and fleet CPU of a 1,000-device OTA campaign, all online** (SQLite, the
service's settings, in one process): a release (a 64 KiB artifact) is checked and stored,
a campaign ``all`` in waves ``1%,10%,100%`` is run to ``done`` by the real campaign runner;
each round the due ``update`` commands are delivered (the publisher's stand-in of
``tests/support/campaign_sim.py``: no broker), each device fetches its manifest and key
list and the artifact in 4 KiB Range requests from the app's routes (``TestClient``),
checks it with the core and reports a signed result through the real ingest
(``tests/support/ota.py``). The clock runs from the campaign's creation to ``done``;
the CPU time of the process is measured alongside (the devices' share included: they run
in the same process, so the fleet's is at most that).

**Baseline in the same run**: the same artifact fetched whole by as many plain GETs from
the same app (the artifact route without ``Range``, no campaign, no checks): the transport
no campaign can skip (the per-device download budget raised for it: it is one member's
capability fetched ``n`` times). ``RUNS`` runs (one: minutes each), the median if more.

**The Pi gateway's artifact download** (``download_run``): the fleet app served over HTTPS
by uvicorn (a throwaway PKI), a ``DOWNLOAD_BYTES`` release, one member's capability URL;
the gateway's ``ota_download.download`` (TLS against the CA only, ``Range: bytes=0-``,
every byte through SHA-256 and into the partial file, fsync and a progress record every
MiB, the digest compared) against a **plain download of the same URL in the same run**
(httpx over the same TLS, the bytes read and dropped: no hash, no disk). The device's
per-device download budget is raised for the bench (it would otherwise throttle one
device's repeated downloads, as it should). ``DOWNLOAD_RUNS`` of each, alternating,
medians.
"""

from __future__ import annotations

import datetime as dt
import hashlib
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

from fastapi.testclient import TestClient  # noqa: E402

from cityedge_fleet import command_key, ota_store  # noqa: E402
from cityedge_fleet.app import create_app  # noqa: E402
from cityedge_fleet.ca import init_ca  # noqa: E402
from cityedge_fleet.campaign_runner import CampaignRunner  # noqa: E402
from cityedge_fleet.config import FleetLimits, Settings  # noqa: E402

from support.ota import OtaSimFleet, ReleaseKit, client_fetch, write_artifact  # noqa: E402

# the per-device download budget raised: the baselines fetch one member's artifact again
# and again, which the budget throttles (as it should for a device)
_UNTHROTTLED = FleetLimits(ota_download_bytes_burst=2**40, ota_download_requests_burst=10**7)
DOWNLOAD_BYTES = 32 * 1024 * 1024
DOWNLOAD_RUNS = 5
RUNS = 1  # one: a 1,000-device campaign takes minutes on this machine (its baseline runs in it)
DEVICES = 1000
ARTIFACT_BYTES = 64 * 1024


def campaign_run(base: Path, ca_dir: Path, n: int = DEVICES) -> dict[str, float]:
    kit = ReleaseKit.make(base)
    settings = Settings(mode="development", database_url="sqlite:///%s" % (base / "f.sqlite3"),
                        ca_dir=ca_dir, ingest_with_serve=False,
                        command_key_file=base / "command.key", audit_key_file=base / "audit.key",
                        ota_dir=base / "ota", ota_root_set_file=kit.root_set_file,
                        ota_public_url="https://fleet.bench", limits=_UNTHROTTLED)
    app = create_app(settings, init_db=True)
    out: dict[str, float] = {}
    with TestClient(app) as client:
        engine: Any = app.state.engine
        sim = OtaSimFleet(engine, settings, kit, client_fetch(client))
        sim.add_devices(n, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        art = write_artifact(base / "fw.bin", ARTIFACT_BYTES)
        data = art.read_bytes()
        with Session(engine) as s:
            up = ota_store.ArtifactUpload(settings, hashlib.sha256(data).hexdigest())
            up.feed(data)
            up.finish()
            rel = ota_store.create_release(s, settings, manifest=kit.sign(art, "1.1.0", 2),
                                           key_list=kit.key_list, by="bench")
            s.commit()
            rid = rel.id or 0
        run = CampaignRunner(engine, settings, command_key.from_settings(settings),
                             renew=False)
        t, cpu = time.perf_counter(), time.process_time()
        with Session(engine) as s:
            camp = ota_store.create_campaign(s, settings, release_id=rid,
                                             selector_text="all", waves="1%,10%,100%",
                                             success="90%", max_failures="5%", by="bench",
                                             confirmed=True)
            s.commit()
            cid = camp.id or 0
        rounds = 0
        while True:
            rounds += 1
            got = run.round(renewal_due=False)
            sim.step()
            if got.ota_campaigns.get(cid) == "done":
                break
            if rounds > 200:
                raise RuntimeError("the OTA campaign did not finish")
        out["wall_s"] = time.perf_counter() - t
        out["cpu_s"] = time.process_time() - cpu
        out["rounds"] = float(rounds)
        with Session(engine) as s:
            st = ota_store.status(s, cid)
        if st["counts"]["committed"] != n:
            raise RuntimeError("only %d of %d devices committed" % (st["counts"]["committed"],
                                                                    n))
        # the baseline: the same artifact fetched whole, n times, from the same route
        token_path = _one_artifact_path(sim)
        t = time.perf_counter()
        for _ in range(n):
            r = client.get(token_path)
            if r.status_code != 200 or len(r.content) != ARTIFACT_BYTES:
                raise RuntimeError("plain GET failed: %d" % r.status_code)
        out["plain_s"] = time.perf_counter() - t
    app.state.engine.dispose()
    return out


def _one_artifact_path(sim: OtaSimFleet) -> str:
    """The artifact path of one member (read from the command it was sent)."""
    from sqlmodel import col, select

    from cityedge_core import update_manifest
    from cityedge_fleet.models import FleetCommand

    from support.rotation import command_args

    with Session(sim.engine) as s:
        cmd = s.exec(select(FleetCommand).where(col(FleetCommand.name) == "update")).first()
        assert cmd is not None
        url, _ = update_manifest.update_args(command_args(cmd))
    return url[len(sim.settings.ota_public_url or ""):] + "artifact"


def download_run(base: Path, ca_dir: Path, runs: int = DOWNLOAD_RUNS) -> dict[str, float]:
    """Seconds of the gateway's download and of a plain GET, medians (module docstring)."""
    import ssl

    import httpx

    from cityedge_gateway.ota_download import download
    from cityedge_gateway.ota_release import VerifiedRelease

    from support.mosquitto import TestPKI
    from support.ota import serve_https

    pki = TestPKI(base / "pki")
    kit = ReleaseKit.make(base)
    settings = Settings(mode="development", database_url="sqlite:///%s" % (base / "d.sqlite3"),
                        ca_dir=ca_dir, ingest_with_serve=False,
                        command_key_file=base / "command.key", audit_key_file=base / "audit.key",
                        ota_dir=base / "ota", ota_root_set_file=kit.root_set_file,
                        ota_public_url="https://127.0.0.1", limits=_UNTHROTTLED)
    app = create_app(settings, init_db=True)
    art = write_artifact(base / "big.bin", DOWNLOAD_BYTES)
    data = art.read_bytes()
    digest = hashlib.sha256(data).digest()
    plain_s: list[float] = []
    ours_s: list[float] = []
    with TestClient(app) as client, serve_https(app, pki) as url:
        engine: Any = app.state.engine
        sim = OtaSimFleet(engine, settings, kit, client_fetch(client))
        sim.add_devices(1, issued=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        with Session(engine) as s:
            up = ota_store.ArtifactUpload(settings, digest.hex())
            up.feed(data)
            up.finish()
            rel = ota_store.create_release(s, settings, manifest=kit.sign(art, "1.2.0", 3),
                                           key_list=kit.key_list, by="bench")
            s.commit()
            ota_store.create_campaign(s, settings, release_id=rel.id or 0,
                                      selector_text="all", waves="100%", success="90%",
                                      max_failures="5%", by="bench", confirmed=True)
            s.commit()
        CampaignRunner(engine, settings, command_key.from_settings(settings),
                       renew=False).round(renewal_due=False)
        artifact_url = url + _one_artifact_path(sim)
        release = VerifiedRelease("gateway", "1.2.0", 3, DOWNLOAD_BYTES, digest, artifact_url)
        ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        for k in range(runs):
            t = time.perf_counter()
            got = 0
            with httpx.Client(verify=ctx, timeout=30, trust_env=False) as http, \
                    http.stream("GET", artifact_url,
                                headers={"Accept-Encoding": "identity"}) as r:
                for chunk in r.iter_raw():
                    got += len(chunk)
            plain_s.append(time.perf_counter() - t)
            if r.status_code != 200 or got != DOWNLOAD_BYTES:
                raise RuntimeError("plain GET: %d, %d bytes" % (r.status_code, got))
            part = base / ("run%d.part" % k)
            t = time.perf_counter()
            download(release, part, ca_file=pki.ca_pem)
            ours_s.append(time.perf_counter() - t)
            if part.stat().st_size != DOWNLOAD_BYTES:
                raise RuntimeError("the gateway's download is not whole")
            part.unlink()
    app.state.engine.dispose()
    return {"dl_plain_s": statistics.median(plain_s), "dl_gateway_s": statistics.median(ours_s)}


def run(quick: bool = False) -> dict[str, Any]:
    runs = 1 if quick else RUNS
    n = DEVICES // 5 if quick else DEVICES
    got: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-ota-") as d:
        base = Path(d)
        init_ca(base / "root", base / "ca")
        for k in range(runs):
            work = base / ("w%d" % k)
            work.mkdir()
            got.append(campaign_run(work, base / "ca", n))
        dl_dir = base / "download"
        dl_dir.mkdir()
        dl = download_run(dl_dir, base / "ca", 3 if quick else DOWNLOAD_RUNS)
    return {"devices": n, "runs": runs, "artifact_bytes": ARTIFACT_BYTES,
            **{"ota_%s" % k: statistics.median(w[k] for w in got)
               for k in ("wall_s", "cpu_s", "rounds", "plain_s")},
            "download_bytes": DOWNLOAD_BYTES, "download_runs": 3 if quick else DOWNLOAD_RUNS,
            **dl}


def report(r: dict[str, Any]) -> None:
    n, size = r["devices"], r["artifact_bytes"]
    print("\nOTA campaign, %d devices all online, waves 1%%,10%%,100%%, %d-byte artifact in "
          "4 KiB ranges, SQLite, median of %d runs:" % (n, size, r["runs"]))
    print("  plain GETs of the whole artifact, as many (baseline) %7.1f s (%.1f MB/s)"
          % (r["ota_plain_s"], n * size / r["ota_plain_s"] / 1e6))
    print("  campaign created -> done, wall time                  %7.1f s (%d runner "
          "rounds; %.1f MB/s of artifact = %.2fx the plain GETs' time)"
          % (r["ota_wall_s"], r["ota_rounds"], n * size / r["ota_wall_s"] / 1e6,
             r["ota_wall_s"] / r["ota_plain_s"]))
    print("  process CPU during the campaign (fleet + devices)    %7.1f s"
          % r["ota_cpu_s"])
    mib = r["download_bytes"] / 2**20
    print("\nPi gateway artifact download, %.0f MiB from the fleet over HTTPS (uvicorn, "
          "loopback), median of %d:" % (mib, r["download_runs"]))
    print("  plain GET of the same URL, bytes dropped (baseline) %7.2f s (%.1f MiB/s)"
          % (r["dl_plain_s"], mib / r["dl_plain_s"]))
    print("  ota_download: Range, SHA-256, file, fsync per MiB   %7.2f s (%.1f MiB/s = "
          "%.2fx the plain GET's rate)" % (r["dl_gateway_s"], mib / r["dl_gateway_s"],
                                          r["dl_plain_s"] / r["dl_gateway_s"]))


if __name__ == "__main__":
    report(run(quick="--quick" in sys.argv))
