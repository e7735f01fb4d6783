"""Fleet benchmark: ingest readings/s per worker, certificates issued/s, registry latency.

- **Ingest** (SQLite and PostgreSQL): 50-reading batches signed by ``N_DEVICES`` devices
  are published (QoS 1) by a separate publisher process through a real Mosquitto (TLS,
  client certificates) to one ``MqttIngestWorker``; the rate is counted from the first to
  the last committed group. The same batches are also fed to ``Ingestor.handle_many``
  directly (no MQTT: the database and verify path alone), and OpenSSL's raw ES256 verify
  of their Sig_structures is the baseline, measured in the same run.
- **Certificates issued per second**: ``CertificateAuthority.sign_csr`` on fresh CSRs
  (checks included).
- **Registry list/filter latency** at ``REGISTRY_DEVICES`` devices (bulk-inserted):
  ``GET /devices`` with and without filters through the ASGI app, p50/p99. The objects
  made at start are frozen out of the garbage collector as ``fleet serve`` does
  (``serve.freeze_startup_objects``); ``REGISTRY_WARMUP`` queries per filter are untimed.

PostgreSQL is a throwaway cluster (``tests/support/pg.py``) with ``fsync`` on, as a server
would run it; SQLite is a WAL file on the local disk with the service's own settings.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, insert
from sqlmodel import Session

from bench.core import make_records
from cityedge_core import batch as batchmod
from cityedge_core import cose
from cityedge_fleet.ca import CertificateAuthority, init_ca
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.db import make_engine, migrate
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import (
    Credential,
    Device,
    DeviceState,
    DeviceTag,
    Reading,
    Role,
)
from cityedge_host.crypto import EcSigner, public_sec1

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

READINGS = 50  # per batch
N_DEVICES = 40
N_BATCHES = 4000  # per ingest run: 200,000 readings
RUNS = 3  # medians of this many runs
CERTS = 200  # certificates per issuance run
REGISTRY_DEVICES = 100_000
REGISTRY_QUERIES = 200  # per filter
REGISTRY_WARMUP = 5  # untimed queries per filter first
PUBLISH_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------- fixtures


class Databases:
    def __init__(self, base: Path, cluster: Any) -> None:
        self.base = base
        self.cluster = cluster
        self.n = 0

    def url(self, kind: str) -> str:
        self.n += 1
        if kind == "sqlite":
            return "sqlite:///%s" % (self.base / ("bench-%d.sqlite3" % self.n))
        return str(self.cluster.new_database())


def _settings(url: str, ca_dir: Path, **kw: Any) -> Settings:
    return Settings(mode="development", database_url=url, ca_dir=ca_dir,
                    ingest_with_serve=False, **kw)


def _engine(settings: Settings) -> Engine:
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    return engine


class Fleet:
    """Devices with keys, registered with active credentials, and their signed batches."""

    def __init__(self, n_devices: int, n_batches: int) -> None:
        self.signers = [EcSigner.generate() for _ in range(n_devices)]
        self.ids = ["urn:dev:mac:0024befffe%06x" % i for i in range(n_devices)]
        writers = [batchmod.BatchWriter(d, s, s.kid)
                   for d, s in zip(self.ids, self.signers, strict=True)]
        self.messages: list[tuple[str, bytes]] = []
        for i in range(n_batches):
            k = i % n_devices
            data = writers[k].sign(make_records(READINGS, 1_790_000_000 + i), boot=1)
            self.messages.append(("ce/v1/%s/up/readings" % self.ids[k], data))

    def register(self, engine: Engine) -> None:
        now = dt.datetime.now(dt.UTC)
        with Session(engine) as s:
            for i, (dev, signer) in enumerate(zip(self.ids, self.signers, strict=True)):
                s.add(Device(id=dev, serial="BENCH-%d" % i, model="m", hardware_class="esp32",
                             state=DeviceState.active))
                s.flush()
                s.add(Credential(device_id=dev, serial="%032x" % i, kid=signer.kid.hex(),
                                 public_key=public_sec1(signer.public_key).hex(),
                                 not_before=now, not_after=now + dt.timedelta(days=90),
                                 cert_pem="(bench)"))
            s.commit()


def _reading_count(engine: Engine) -> int:
    from sqlalchemy import func, select

    with Session(engine) as s:
        return int(s.execute(select(func.count()).select_from(Reading)).scalar_one())


# ---------------------------------------------------------------------------- ingest


def raw_verify_rate(fleet: Fleet) -> float:
    """OpenSSL ES256 verifies per second of the batches' Sig_structures (baseline)."""
    keys = {s.kid: s.public_key for s in fleet.signers}
    work = []
    for _, data in fleet.messages:
        msg = cose.decode_sign1(data)
        sig = encode_dss_signature(int.from_bytes(msg.signature[:32], "big"),
                                   int.from_bytes(msg.signature[32:], "big"))
        work.append((keys[msg.kid], sig, msg.to_be_signed()))
    algo = ec.ECDSA(hashes.SHA256())
    t = time.perf_counter()
    for pub, sig, tbs in work:
        pub.verify(sig, tbs, algo)
    return len(work) / (time.perf_counter() - t)


def direct_ingest_rate(fleet: Fleet, url: str, ca_dir: Path, group: int = 200) -> float:
    """Readings/s through ``Ingestor.handle_many`` without MQTT (database + verify path)."""
    settings = _settings(url, ca_dir)
    engine = _engine(settings)
    try:
        fleet.register(engine)
        ing = Ingestor(engine, settings)
        msgs = fleet.messages
        t = time.perf_counter()
        for i in range(0, len(msgs), group):
            outs = ing.handle_many(msgs[i:i + group])
            if any(o.status != "ok" for o in outs):
                raise SystemExit("bench: unexpected verdicts %s" % ing.counts)
        elapsed = time.perf_counter() - t
        assert _reading_count(engine) == len(msgs) * READINGS
        return len(msgs) * READINGS / elapsed
    finally:
        engine.dispose()


PUBLISHER = r"""
import pickle, sys, time
import paho.mqtt.client as mqtt
port, ca, cert, key, path = sys.argv[1:6]
msgs = pickle.load(open(path, "rb"))
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", int(port))
c.loop_start()
t = time.perf_counter()
infos = [c.publish(topic, data, qos=1) for topic, data in msgs]
for info in infos:
    info.wait_for_publish(120)
print(len(msgs) / (time.perf_counter() - t))
c.disconnect()
c.loop_stop()
"""


class _Timed(Ingestor):
    """An Ingestor that records when each group committed and how many readings it held."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.commits: list[tuple[float, int]] = []

    def handle_many(self, messages: Any) -> Any:
        outs = super().handle_many(messages)
        self.commits.append((time.perf_counter(), sum(o.readings for o in outs)))
        return outs


def mqtt_ingest_rate(fleet: Fleet, url: str, ca_dir: Path, broker: Any, pki: Any,
                     work: Path) -> dict[str, float]:
    """Readings/s of one MQTT ingest worker, from the first to the last committed group."""
    import pickle

    from cityedge_fleet.ingest_mqtt import MqttIngestWorker

    ingest_creds = pki.issue_client("fleet-ingest")
    pub_creds = pki.issue_client("bench-publisher")
    settings = _settings(url, ca_dir, mqtt_port=broker.port, mqtt_ca_file=pki.ca_pem,
                         mqtt_cert_file=ingest_creds.cert_pem,
                         mqtt_key_file=ingest_creds.key_pem,
                         # the broker forgets the session (and its share of the group) when
                         # the run disconnects: an earlier run's session would otherwise
                         # keep a share, queueing a copy of every later run's messages
                         limits=FleetLimits(ingest_session_expiry_s=0))
    engine = _engine(settings)
    fleet.register(engine)
    ing = _Timed(engine, settings)
    worker = MqttIngestWorker(ing, settings).start()
    try:
        if not worker.subscribed.wait(10):
            raise SystemExit("bench: the ingest did not subscribe: %s" % broker.read_log())
        path = work / "messages.pickle"
        path.write_bytes(pickle.dumps(fleet.messages))
        pub = subprocess.run([sys.executable, "-c", PUBLISHER, str(broker.port),
                              str(pki.ca_pem), str(pub_creds.cert_pem), str(pub_creds.key_pem),
                              str(path)], capture_output=True, text=True,
                             timeout=PUBLISH_TIMEOUT_S)
        if pub.returncode != 0:
            raise SystemExit("bench: publisher failed: %s" % pub.stderr)
        want = len(fleet.messages) * READINGS
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while sum(n for _, n in ing.commits) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sum(n for _, n in ing.commits)
        if got != want or ing.counts.get("ok") != len(fleet.messages):
            raise SystemExit("bench: stored %d of %d readings (%s)" % (got, want, ing.counts))
        (t0, n0), (t1, _) = ing.commits[0], ing.commits[-1]
        return {"readings_per_s": (got - n0) / (t1 - t0),
                "publisher_msgs_per_s": float(pub.stdout.strip()),
                "groups": float(len(ing.commits))}
    finally:
        worker.stop()
        engine.dispose()


def _settle(cluster: Any) -> None:
    """Start a timed run from a settled machine: the previous run's dirty PostgreSQL
    buffers checkpointed and SQLite's files written back, so one run does not pay for the
    writes of the one before (each run still pays its own commits, fsync on)."""
    import psycopg

    with psycopg.connect(cluster.admin_url(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    os.sync()


# ---------------------------------------------------------------------------- CA


def cert_issue_rate(ca_dir: Path, n: int = CERTS) -> float:
    ca = CertificateAuthority(ca_dir)
    csrs = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        dev = "urn:dev:mac:0024beff%08x" % i
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dev)]))
               .sign(key, hashes.SHA256()))
        csrs.append((csr.public_bytes(serialization.Encoding.PEM), dev))
    t = time.perf_counter()
    for pem, dev in csrs:
        ca.sign_csr(pem, dev)
    return n / (time.perf_counter() - t)


# ---------------------------------------------------------------------------- registry

SITES = 100
MODELS = 10
CLASSES = ("esp32", "rp2", "rpi")


def _bulk_devices(engine: Engine, n: int) -> None:
    now = dt.datetime.now(dt.UTC)
    chunk = 10_000
    with Session(engine) as s:
        for start in range(0, n, chunk):
            devs = [{"id": "urn:dev:mac:%012x" % i, "serial": "SN%09d" % i,
                     "model": "model-%d" % (i % MODELS),
                     "hardware_class": CLASSES[i % len(CLASSES)],
                     "site": "site-%03d" % (i % SITES), "firmware_version": "1.%d" % (i % 7),
                     "state": ("active", "provisioned", "quarantined")[i % 3],
                     "forgeries": 0, "created_at": now, "last_seen": None}
                    for i in range(start, min(n, start + chunk))]
            s.execute(insert(Device), devs)
            s.execute(insert(DeviceTag), [{"device_id": d["id"], "tag": "tag-%d" % (i % 50)}
                                          for i, d in enumerate(devs, start)])
        s.commit()
    if engine.dialect.name == "postgresql":  # what autovacuum would do in the middle
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.connect() as c:
            c.exec_driver_sql("ANALYZE")


def registry_latency(url: str, ca_dir: Path, n: int = REGISTRY_DEVICES) -> dict[str, Any]:
    """p50/p99 milliseconds of ``GET /devices`` pages (100 rows) with and without filters."""
    from fastapi.testclient import TestClient

    from cityedge_fleet.app import create_app
    from cityedge_fleet.auth import create_api_token
    from cityedge_fleet.serve import freeze_startup_objects

    settings = _settings(url, ca_dir)
    app = create_app(settings, init_db=True)
    out: dict[str, Any] = {}
    with TestClient(app) as client:
        freeze_startup_objects()  # as `fleet serve` does once the app is up
        engine = app.state.engine
        _bulk_devices(engine, n)
        with Session(engine) as s:
            _, tok = create_api_token(s, name="bench", role=Role.viewer, created_by="bench")
            s.commit()
        headers = {"Authorization": "Bearer %s" % tok}
        filters: dict[str, dict[str, str]] = {
            "first page": {},
            "deep page (after=)": {"after": "urn:dev:mac:%012x" % (n // 2)},
            "site": {"site": "site-042"},
            "state+class": {"state": "quarantined", "hardware_class": "rpi"},
            "tag": {"tag": "tag-7"},
            "model+site+firmware": {"model": "model-3", "site": "site-013",
                                    "firmware_version": "1.3"},
        }
        for name, params in filters.items():
            for _ in range(REGISTRY_WARMUP):  # plans and caches, as on a running server
                client.get("/devices", params=params, headers=headers)
            times = []
            for _ in range(REGISTRY_QUERIES):
                t = time.perf_counter()
                r = client.get("/devices", params=params, headers=headers)
                times.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise SystemExit("bench: GET /devices %s -> %d" % (params, r.status_code))
            times.sort()
            out[name] = {"p50_ms": times[len(times) // 2],
                         "p99_ms": times[int(len(times) * 0.99) - 1],
                         "rows": len(r.json()["data"])}
    app.state.engine.dispose()
    gc.unfreeze()
    return out


# ---------------------------------------------------------------------------- all


def run(quick: bool = False) -> dict[str, Any]:
    from cityedge_fleet.broker_acl import Acl
    from tests.support.pg import pg_cluster

    from support.mosquitto import Mosquitto, TestPKI

    runs = 1 if quick else RUNS
    n_batches = N_BATCHES // 4 if quick else N_BATCHES
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-fleet-") as d, \
            pg_cluster(fsync=True) as cluster:
        base = Path(d)
        base.chmod(0o755)
        init_ca(base / "root", base / "ca")
        dbs = Databases(base, cluster)
        pki = TestPKI(base / "pki")
        # one load generator publishes for every simulated device (a test-only identity)
        broker = Mosquitto(pki, base / "broker",
                           extra="max_inflight_messages 0\nmax_queued_messages 0")
        broker.grant_custom("bench-publisher", [Acl("publishClientSend", "ce/v1/+/up/#")])
        broker.start()
        try:
            raw: list[float] = []
            direct: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
            viamqtt: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
            pub: list[float] = []
            for _ in range(runs):
                fleet = Fleet(N_DEVICES, n_batches)
                raw.append(raw_verify_rate(fleet))
                for kind in ("sqlite", "postgresql"):
                    _settle(cluster)
                    direct[kind].append(direct_ingest_rate(fleet, dbs.url(kind), base / "ca"))
                    _settle(cluster)
                    m = mqtt_ingest_rate(fleet, dbs.url(kind), base / "ca", broker, pki, base)
                    viamqtt[kind].append(m["readings_per_s"])
                    pub.append(m["publisher_msgs_per_s"])
            results["raw_es256_verify_per_s"] = statistics.median(raw)
            for kind in ("sqlite", "postgresql"):
                results["ingest_mqtt_%s_readings_per_s" % kind] = statistics.median(
                    viamqtt[kind])
                results["ingest_direct_%s_readings_per_s" % kind] = statistics.median(
                    direct[kind])
            results["publisher_msgs_per_s"] = statistics.median(pub)
        finally:
            broker.stop()
        results["certs_per_s"] = statistics.median(
            cert_issue_rate(base / "ca", CERTS // 4 if quick else CERTS) for _ in range(runs))
        n = REGISTRY_DEVICES // 10 if quick else REGISTRY_DEVICES
        results["registry_devices"] = n
        for kind in ("sqlite", "postgresql"):
            results["registry_%s" % kind] = registry_latency(dbs.url(kind), base / "ca", n)
    return results


def report(r: dict[str, Any]) -> None:
    raw = r["raw_es256_verify_per_s"]
    print("\nFleet ingest, 50-reading batches, one worker, median of %d runs:" % RUNS)
    print("  raw OpenSSL ES256 verify (baseline)  %10.0f batches/s = %.0f readings/s"
          % (raw, raw * READINGS))
    for kind in ("sqlite", "postgresql"):
        m = r["ingest_mqtt_%s_readings_per_s" % kind]
        print("  ingest via Mosquitto -> %-10s   %10.0f readings/s (%.0f batches/s, "
              "%.2f of raw verify)" % (kind, m, m / READINGS, m / READINGS / raw))
        print("    same batches, no MQTT (handle_many) %9.0f readings/s"
              % r["ingest_direct_%s_readings_per_s" % kind])
    print("  publisher (separate process)         %10.0f msgs/s" % r["publisher_msgs_per_s"])
    print("  target: >= 100,000 readings/s per worker into PostgreSQL")
    print("\nCertificates issued (CSR checked + signed)  %8.0f /s" % r["certs_per_s"])
    print("\nRegistry GET /devices (100 rows/page) at %d devices, ms:" % r["registry_devices"])
    print("  %-24s %16s %16s" % ("query", "sqlite p50/p99", "postgresql p50/p99"))
    for name in r["registry_sqlite"]:
        s, p = r["registry_sqlite"][name], r["registry_postgresql"][name]
        print("  %-24s %7.1f /%7.1f %7.1f /%7.1f" % (name, s["p50_ms"], s["p99_ms"],
                                                    p["p50_ms"], p["p99_ms"]))
    print("  target: p99 < 50 ms")


if __name__ == "__main__":
    report(run(quick="--quick" in sys.argv))
    os._exit(0)
