"""Ingest scale-out: readings/s into PostgreSQL with 1, 2 and 4 ``cityedge fleet ingest``
processes sharing the stream (MQTT 5 shared subscription), in the same run.

The same 50-reading batches of ``bench.fleet.Fleet`` are published (QoS 1) by a separate
publisher process through a real Mosquitto (TLS, client certificates) while N worker
processes (each its own certificate and client id, as in production) store them into one
PostgreSQL (``fsync`` on). The rate is the readings stored divided by the time from the
first stored row to the last (the database is polled every 50 ms). The baseline is the
one-worker rate of the same run; the target is 2 workers >= 1.8 x one.

On a machine with fewer cores than workers + PostgreSQL + broker + publisher, the curve
measures the machine, not the ingest: the report prints the core count next to it, and
the CPU each part used between the first and the last stored row (``/proc/<pid>/stat``,
as ``bench.city``): CPU seconds per 1,000 readings of the workers, PostgreSQL (the
postmaster and its children), the broker and the publisher, and how busy that left the
machine (their CPU / (wall time x cores)). Workers whose CPU per reading stays flat
while the rate does not grow are waiting for cores, not for each other.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

WORKERS = (1, 2, 4)
N_BATCHES = 4000  # 200,000 readings per run
RUNS = 3
TIMEOUT_S = 300.0


class Progress:
    """How many readings are stored, asked every 50 ms on one connection: the newest id
    while it is below what is wanted (the primary key's index, a few blocks; each run's
    database is new, so ids start at 1 and the newest bounds the count from above), the
    exact count once it is not. A ``count(*)`` of a growing table every 50 ms (a new
    connection each, as this bench did until 2026-12-05) took CPU the workers needed.
    Not the newest id minus the first one seen: with several workers a transaction that
    took lower ids can commit later, and that difference stayed short of the count."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.started = False

    def stored(self, want: int) -> int:
        newest = self.conn.execute("SELECT max(id) FROM reading").fetchone()[0]  # type: ignore[index]
        if newest is None:
            return 0
        if self.started and int(newest) < want:
            return int(newest)
        self.started = True  # the first rows are counted: the rate starts from them
        return int(self.conn.execute("SELECT count(*) FROM reading").fetchone()[0])  # type: ignore[index]

    def close(self) -> None:
        self.conn.close()


PARTS = ("workers", "postgresql", "broker", "publisher")


def one_run(n_workers: int, fleet: Any, cluster: Any, base: Path, pki: Any
            ) -> tuple[float, dict[str, float]]:
    """Readings/s stored, and CPU seconds per 1,000 readings of each of ``PARTS`` plus
    ``busy`` (their CPU over wall time x cores) over the same span."""
    from bench.city import cpu_delta, cpu_ticks, pids_where, postmaster_pid
    from bench.fleet import PUBLISHER, READINGS
    from cityedge_fleet.broker_acl import Acl
    from cityedge_fleet.config import FleetLimits, Settings
    from cityedge_fleet.db import make_engine, migrate

    from support.faults import IngestProc
    from support.mosquitto import Mosquitto

    work = Path(tempfile.mkdtemp(prefix="w%d-" % n_workers, dir=base))
    work.chmod(0o755)
    url = cluster.new_database()
    broker = Mosquitto(pki, work / "broker",
                       extra="max_inflight_messages 0\nmax_queued_messages 0")
    broker.grant_custom("bench-publisher", [Acl("publishClientSend", "ce/v1/+/up/#")])
    broker.start()
    cns = ["fleet-ingest"] + ["fleet-ingest-%d" % k for k in range(2, n_workers + 1)]
    broker.grant(*cns)
    settings = Settings(mode="development", database_url=url, ca_dir=base / "ca",
                        mqtt_port=broker.port, mqtt_ca_file=pki.ca_pem,
                        audit_key_file=base / "audit.key", command_key_file=base / "cmd.key",
                        limits=FleetLimits())
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    fleet.register(engine)
    engine.dispose()
    rig = SimpleNamespace(pki=pki, dir=work, settings=settings, broker=broker,
                          worker_db_url=lambda cn: url + "?application_name=" + cn)
    env = {"CITYEDGE_LIMITS__INGEST_SESSION_EXPIRY_S": "0",
           "CITYEDGE_INGEST_SUBSCRIPTION": "shared",
           "CITYEDGE_LIMITS__INGEST_GROUP_MAX_S": "0.05"}
    workers = []
    try:
        workers = [IngestProc(rig, cn, env).start() for cn in cns]
        pub = pki.issue_client("bench-publisher")
        import pickle

        path = work / "messages.pickle"
        path.write_bytes(pickle.dumps(fleet.messages))
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(broker.port),
                                 str(pki.ca_pem), str(pub.cert_pem), str(pub.key_pem),
                                 str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        want = len(fleet.messages) * READINGS
        first = last = None
        deadline = time.monotonic() + TIMEOUT_S
        n = 0
        groups = {"workers": {w.proc.pid for w in workers if w.proc is not None},
                  "postgresql": pids_where(4, postmaster_pid(cluster)),
                  "broker": {broker.proc.pid} if broker.proc is not None else set(),
                  "publisher": {proc.pid}}
        ticks: dict[str, dict[int, int]] = {}
        progress = Progress(url)
        while time.monotonic() < deadline:
            n = progress.stored(want)
            now = time.perf_counter()
            if n and first is None:
                first, n_first = now, n
                ticks = {k: cpu_ticks(v) for k, v in groups.items()}
            if n >= want:
                last = now
                break
            time.sleep(0.05)
        after = {k: cpu_ticks(v) for k, v in groups.items()}
        progress.close()
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        if last is None or first is None:
            logs = "\n".join("%s: %s" % (w.cn, "\n  ".join(
                w.log.read_text(errors="replace").splitlines()[-8:])) for w in workers)
            import psycopg

            with psycopg.connect(url) as c:
                seen = c.execute("SELECT count(*) FROM reading").fetchone()
                events = c.execute("SELECT status, count(*), sum(missing) FROM ingest_event "
                                   "GROUP BY status").fetchall()
                dead = c.execute("SELECT count(*) FROM ingest_dead_letter").fetchone()
            raise SystemExit("bench scaling: %d workers stored %d of %d readings (a new "
                             "connection counts %s; ingest events %s; dead letters %s); the "
                             "workers' last lines:\n%s"
                             % (n_workers, n, want, seen, events, dead, logs))
        stored = want - n_first
        cpu = {k: cpu_delta(ticks[k], after[k]) for k in PARTS}
        per_k = {k: 1000 * v / stored for k, v in cpu.items()}
        per_k["busy"] = sum(cpu.values()) / ((last - first) * (os.cpu_count() or 1))
        # the publisher's own rate (every message PUBACKed): a curve flat at it would
        # measure the publisher, not the workers
        per_k["publisher_readings_per_s"] = float(out.split()[-1]) * READINGS
        return stored / (last - first), per_k
    finally:
        for w in workers:
            w.stop()
        broker.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def run(quick: bool = False) -> dict[str, Any]:
    from bench.fleet import N_DEVICES, Fleet
    from cityedge_fleet.ca import init_ca

    from support.mosquitto import TestPKI
    from support.pg import pg_cluster

    runs = 1 if quick else RUNS
    n_batches = N_BATCHES // 4 if quick else N_BATCHES
    rates: dict[int, list[float]] = {n: [] for n in WORKERS}
    cpus: dict[int, list[dict[str, float]]] = {n: [] for n in WORKERS}
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-scale-") as d, \
            pg_cluster(fsync=True) as cluster:
        base = Path(d)
        base.chmod(0o755)
        init_ca(base / "root", base / "ca")
        pki = TestPKI(base / "pki")
        for _ in range(runs):
            fleet = Fleet(N_DEVICES, n_batches)
            for n in WORKERS:  # interleaved: every run measures each size
                rate, cpu = one_run(n, fleet, cluster, base, pki)
                rates[n].append(rate)
                cpus[n].append(cpu)
    med = {n: statistics.median(v) for n, v in rates.items()}
    return {"cores": os.cpu_count(), "runs": runs, "readings": n_batches * 50,
            "readings_per_s": {str(n): med[n] for n in WORKERS},
            "speedup": {str(n): med[n] / med[1] for n in WORKERS},
            "cpu_per_1000": {str(n): {k: statistics.median(c[k] for c in cpus[n])
                                      for k in (*PARTS, "busy", "publisher_readings_per_s")}
                             for n in WORKERS}}


def report(r: dict[str, Any]) -> None:
    print("\nIngest scale-out into PostgreSQL, %d readings a run, median of %d, %s cores:"
          % (r["readings"], r["runs"], r["cores"]))
    for n, rate in r["readings_per_s"].items():
        print("  %s worker(s)  %10.0f readings/s   %.2f x one worker"
              % (n, rate, r["speedup"][n]))
    print("  target: 2 workers >= 1.80 x one")
    print("  CPU s per 1,000 readings (median): %s; machine busy" % ", ".join(PARTS))
    for n, c in r["cpu_per_1000"].items():
        print("  %s worker(s)  %s   %.0f %%   (publisher: %.0f readings/s)" % (
            n, "  ".join("%.3f" % c[k] for k in PARTS), 100 * c["busy"],
            c["publisher_readings_per_s"]))


if __name__ == "__main__":
    report(run(quick="--quick" in sys.argv))
    os._exit(0)
