"""Key rotation and revocation benchmark (``make bench``; alone: ``python -m bench.rotation``).

- **Rotations completed per second by the fleet**: devices with an open rotation (its
  rotate command queued) send their ``up/csr`` messages; the real ingest
  (``Ingestor.handle_many``, groups of ``GROUP``) decodes each, verifies the proof with the
  device's active key, checks the rotation and the CSR, signs the certificate, stores the
  credential and queues the signed ``install-cert``: the fleet's whole share of a rotation
  but the batch that proves it. Baseline in the same run, interleaved: the raw CA,
  ``CertificateAuthority.sign_csr`` on the same number of fresh CSRs (no proof, no
  database, no command). SQLite and PostgreSQL, median of ``RUNS``.
- **Many fast devices rotated at once**: ``FAST_DEVICES`` fast CPython devices
  (``cityedge.fastdevice``, one asyncio loop) on a real Mosquitto and the real fleet
  (SQLite): the wall time until all are ``old-revoked``, against the wall time until all
  answered one signed ``status`` command (one command round trip each), same run.
- **Revocation to broker refusal**: a device connected to a real Mosquitto (mTLS, the
  fleet's CRL, dynamic security) through the real fleet; ``revoke.revoke_device`` runs
  (every certificate revoked, CRL re-signed, SIGHUP, the device cut and quarantined) and
  the clock stops when a fresh connection with the device's certificate is refused
  (attempts back to back). Baseline in the same run: the same refusal measured for a
  certificate that was on the CRL already (what one refused attempt costs: the floor of
  the method). Median of ``REVOKE_RUNS``; target < 5 s.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import Session

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from cityedge_core import csr as corecsr  # noqa: E402
from cityedge_core import rotation as corerot  # noqa: E402
from cityedge_core import topics  # noqa: E402
from cityedge_fleet import rotation  # noqa: E402
from cityedge_fleet.ca import CertificateAuthority, init_ca  # noqa: E402
from cityedge_fleet.config import FleetLimits, Settings  # noqa: E402
from cityedge_fleet.db import make_engine, migrate  # noqa: E402
from cityedge_fleet.ingest import Ingestor  # noqa: E402
from cityedge_fleet.models import Credential, Device, DeviceState  # noqa: E402
from cityedge_fleet.rotation_ingest import CSR_TAKEN  # noqa: E402
from cityedge_host.crypto import EcSigner, public_sec1  # noqa: E402

RUNS = 3
ROTATIONS = 300  # devices rotated per run
GROUP = 50  # messages per ingest transaction
REVOKE_RUNS = 5
FAST_DEVICES = 200  # fast devices rotated at once (one run: its baseline is in the run)
ATTEMPT_TIMEOUT_S = 5.0


class _Key:
    def __init__(self, signer: EcSigner) -> None:
        self.signer = signer

    def public_key(self) -> _Key:
        return self

    def to_sec1(self) -> bytes:
        return public_sec1(self.signer.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signer.sign(message)


def _fleet_db(url: str, ca_dir: Path, base: Path, n: int) -> tuple[Settings, Any,
                                                                    list[tuple[str, bytes]]]:
    """``n`` active devices with a key each, a rotation each (rotate command queued), and
    the up/csr message each device sends (built untimed)."""
    import datetime as dt

    settings = Settings(mode="development", database_url=url, ca_dir=ca_dir,
                        ingest_with_serve=False, command_key_file=base / "command.key",
                        audit_key_file=base / "audit.key",
                        limits=FleetLimits(command_pending_max=4))
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    from cityedge_fleet import command_key

    cmdkey = command_key.from_settings(settings)
    now = dt.datetime.now(dt.UTC)
    olds = [EcSigner.generate() for _ in range(n)]
    ids = ["urn:dev:mac:00bebe%010x" % i for i in range(n)]
    with Session(engine) as s:
        for i, (dev, key) in enumerate(zip(ids, olds, strict=True)):
            s.add(Device(id=dev, serial="ROT-%d" % i, model="m", hardware_class="esp32",
                         state=DeviceState.active))
            s.flush()
            s.add(Credential(device_id=dev, serial="%032x" % (i + 1), kid=key.kid.hex(),
                             public_key=public_sec1(key.public_key).hex(), not_before=now,
                             not_after=now + dt.timedelta(days=90), cert_pem="(bench)"))
        s.commit()
        rids = []
        for dev in ids:
            rot = rotation.start_rotation(s, dev, by="bench", signer=cmdkey,
                                          lim=settings.limits)
            rids.append(rot.id or 0)
        s.commit()
    msgs = []
    for dev, key, rid in zip(ids, olds, rids, strict=True):
        der = corecsr.build_csr(_Key(EcSigner.generate()), dev)
        msgs.append((topics.up(dev, topics.CSR),
                     corerot.csr_message(key, key.kid, dev, rid, der)))
    return settings, engine, msgs


def rotation_rate(url: str, ca_dir: Path, base: Path, n: int = ROTATIONS) -> float:
    settings, engine, msgs = _fleet_db(url, ca_dir, base, n)
    ing = Ingestor(engine, settings)
    t = time.perf_counter()
    taken = 0
    for i in range(0, len(msgs), GROUP):
        taken += sum(o.status == CSR_TAKEN for o in ing.handle_many(msgs[i:i + GROUP]))
    rate = n / (time.perf_counter() - t)
    engine.dispose()
    if taken != n:
        raise RuntimeError("only %d of %d CSRs taken" % (taken, n))
    return rate


def raw_issue_rate(ca_dir: Path, n: int = ROTATIONS) -> float:
    ca = CertificateAuthority(ca_dir)
    csrs = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        dev = "urn:dev:mac:00cafe%010x" % i
        req = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dev)]))
               .sign(key, hashes.SHA256()))
        csrs.append((req.public_bytes(serialization.Encoding.PEM), dev))
    t = time.perf_counter()
    for pem, dev in csrs:
        ca.sign_csr(pem, dev)
    return n / (time.perf_counter() - t)


# ---------------------------------------------------------------------------- revocation


def refused(port: int, ca: Path, cert: Path, key: Path, client_id: str) -> bool:
    """One connection attempt with this certificate: True when the broker refuses it (TLS
    alert, a close before CONNACK, or a CONNACK refusal)."""
    import paho.mqtt.client as mqtt

    done = threading.Event()
    ok: list[bool] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        ok.append(not reason.is_failure)
        done.set()

    def on_disconnect(*_a: Any) -> None:
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except OSError:
        return True
    deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
    while not done.is_set() and time.monotonic() < deadline:
        try:
            client.loop(0.02)
        except OSError:
            return True
    with contextlib.suppress(Exception):
        client.disconnect()
    return not (ok and ok[0])


def revocation_latency(db_url: str, runs: int = REVOKE_RUNS) -> dict[str, Any]:
    from cityedge_fleet import revoke
    from cityedge_fleet.models import RevokeReason

    from support.fastfleet import enroll_fast, real_fleet
    from support.mosquitto import TestPKI

    with tempfile.TemporaryDirectory(prefix="cityedge-bench-revoke-") as d:
        base = Path(d)
        base.chmod(0o755)
        pki = TestPKI(base / "pki")
        latency, floor = [], []
        with real_fleet(db_url, pki) as f:
            ca = CertificateAuthority(f.settings.ca_dir)
            for i in range(runs):
                dev, first = enroll_fast(f, 100 + i)
                args = (f.broker.port, f.pki.ca_pem, first / "chain.pem", first / "key.pem",
                        dev.id)
                if refused(*args):
                    raise RuntimeError("a fresh device is refused before its revocation")
                t0 = time.perf_counter()
                with Session(f.api.engine) as s:
                    revoke.revoke_device(s, device_id=dev.id,
                                         reason=RevokeReason.key_compromise, note="bench",
                                         by="bench", source="bench", ca=ca,
                                         settings=f.settings,
                                         broker=f.api.client.app.state.broker_access)  # type: ignore[attr-defined]
                while not refused(*args):
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError("the broker still lets a revoked device in")
                latency.append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                if not refused(*args):  # the baseline: already on the CRL
                    raise RuntimeError("a revoked device got in again")
                floor.append(time.perf_counter() - t1)
    return {"revoke_to_refusal_s": statistics.median(latency),
            "revoke_to_refusal_max_s": max(latency),
            "refused_attempt_s": statistics.median(floor), "revoke_runs": runs}


def run(quick: bool = False) -> dict[str, Any]:
    from tests.support.pg import pg_cluster

    runs = 1 if quick else RUNS
    n = ROTATIONS // 3 if quick else ROTATIONS
    results: dict[str, Any] = {"rotations_per_run": n}
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-rot-") as d, \
            pg_cluster(fsync=True) as cluster:
        base = Path(d)
        init_ca(base / "root", base / "ca")
        rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        raw: list[float] = []
        k = 0
        for _ in range(runs):
            raw.append(raw_issue_rate(base / "ca", n))
            for kind in ("sqlite", "postgresql"):
                k += 1
                url = ("sqlite:///%s" % (base / ("rot-%d.sqlite3" % k)) if kind == "sqlite"
                       else str(cluster.new_database()))
                work = base / ("w%d" % k)
                work.mkdir()
                rates[kind].append(rotation_rate(url, base / "ca", work, n))
        results["raw_issue_per_s"] = statistics.median(raw)
        for kind in rates:
            results["rotations_%s_per_s" % kind] = statistics.median(rates[kind])
        results.update(revocation_latency("sqlite:///%s" % (base / "revoke.sqlite3"),
                                          2 if quick else REVOKE_RUNS))
        results.update(fast_devices_rotation("sqlite:///%s" % (base / "many.sqlite3"),
                                             FAST_DEVICES // 4 if quick else FAST_DEVICES))
    return results


def report(r: dict[str, Any]) -> None:
    raw = r["raw_issue_per_s"]
    print("\nKey rotation, the fleet's share (up/csr checked, certificate signed, stored, "
          "install-cert queued), %d devices, median of %d runs:" % (r["rotations_per_run"],
                                                                   RUNS))
    print("  raw CA sign_csr (baseline)           %10.0f /s" % raw)
    for kind in ("sqlite", "postgresql"):
        m = r["rotations_%s_per_s" % kind]
        print("  rotations into %-10s            %10.0f /s (%.2f of raw issuance)"
              % (kind, m, m / raw))
    print("\nEmergency revocation to broker refusal, median of %d runs:" % r["revoke_runs"])
    print("  one refused attempt, cert already on the CRL (baseline) %6.3f s"
          % r["refused_attempt_s"])
    print("  revoke command -> a fresh connection refused            %6.3f s (max %.3f; "
          "target < 5 s)" % (r["revoke_to_refusal_s"], r["revoke_to_refusal_max_s"]))
    print("\n%d fast devices (one process, real mTLS, real broker and fleet on SQLite), one "
          "run:" % r["fast_devices"])
    print("  every device answers a status command (baseline)       %6.1f s"
          % r["all_answer_status_s"])
    print("  every device rotated (rotate .. old-revoked)            %6.1f s"
          % r["all_rotated_s"])



# ---------------------------------------------------------------------------- many devices


def fast_devices_rotation(db_url: str, n: int) -> dict[str, Any]:
    """``n`` fast devices (one asyncio loop, real mTLS to a real Mosquitto, the real fleet)
    streaming a batch every 2 s: the wall time until every one has answered a ``status``
    command (the baseline: one signed command round trip each), then until every one is
    rotated (``old-revoked``: rotate, CSR, install-cert, a batch under the new key,
    erase-key)."""
    from sqlmodel import col, func, select

    from cityedge_fleet import command_key, command_queue
    from cityedge_fleet.models import CommandState, FleetCommand, KeyRotation, RotationState

    from support.fastfleet import DeviceLoop, enroll_fast, real_fleet
    from support.fleet import wait_for
    from support.mosquitto import TestPKI

    def count(engine: Any, query: Any) -> int:
        with Session(engine) as s:
            return int(s.exec(query).one())

    with tempfile.TemporaryDirectory(prefix="cityedge-bench-many-") as d:
        base = Path(d)
        base.chmod(0o755)
        pki = TestPKI(base / "pki")
        with real_fleet(db_url, pki) as f:
            devs = [enroll_fast(f, 1000 + i, interval_s=2.0)[0] for i in range(n)]
            engine = f.api.engine
            signer = command_key.from_settings(f.settings)
            loop = DeviceLoop(devs).start()
            try:
                if not wait_for(lambda: all(x.stats.published >= 1 for x in devs), 120):
                    raise RuntimeError("not every fast device is streaming")
                t = time.perf_counter()
                with Session(engine) as s:
                    for x in devs:
                        command_queue.queue(s, signer=signer, device_id=x.id, name="status",
                                            args=None, expires_in_s=None, created_by="bench",
                                            lim=f.settings.limits)
                    s.commit()
                f.publisher.wake()
                answered = select(func.count()).select_from(FleetCommand).where(
                    col(FleetCommand.state) == CommandState.ok)
                if not wait_for(lambda: count(engine, answered) == n, 300):
                    raise RuntimeError("not every device answered its status command")
                status_s = time.perf_counter() - t
                t = time.perf_counter()
                with Session(engine) as s:
                    for x in devs:
                        rotation.start_rotation(s, x.id, by="bench", signer=signer,
                                                lim=f.settings.limits)
                    s.commit()
                f.publisher.wake()
                done = select(func.count()).select_from(KeyRotation).where(
                    col(KeyRotation.state) == RotationState.old_revoked)
                if not wait_for(lambda: count(engine, done) == n, 600):
                    raise RuntimeError("only %d of %d rotated" % (count(engine, done), n))
                rotate_s = time.perf_counter() - t
            finally:
                loop.stop()
    return {"fast_devices": n, "all_answer_status_s": status_s, "all_rotated_s": rotate_s}


if __name__ == "__main__":
    report(run(quick="--quick" in sys.argv))
