"""City scale: many simulated devices at a realistic rate through the broker into PostgreSQL
with two ingest workers, for the 3-node RabbitMQ cluster and single-node Mosquitto in the
same run (issue 19, docs/CAPACITY.md).

Each device is a fast CPython device (``cityedge.fastdevice``): its own key and client
certificate, real mTLS MQTT (TLS 1.2+, QoS 1), the shared core's signed batches of
``readings`` readings, one batch every ``interval_s`` with +-``JITTER`` jitter and a random
phase, each batch kept until the broker's PUBACK. The devices connect spread over
``ramp_s`` (no herd at start) and all run in one asyncio loop of this process. Two
``cityedge fleet ingest`` processes (production's command line and transport for the
engine: MQTT 5 shared subscription on Mosquitto, AMQP competing consumers of the quorum
queue on RabbitMQ) store into one PostgreSQL (``fsync`` on). The devices are registered
straight in the database (enrollment through the API is not what is measured).

Figures, per engine, over a window of ``window_s`` after ``warm_s`` of steady running:

- **readings/s stored**: rows committed in the window / the window;
- **latency from signing to stored**: the device records the wall clock when it signs each
  batch (``CityDevice.signed_at``; the batch itself carries whole seconds only); the commit
  time is PostgreSQL's own commit timestamp of the row's transaction
  (``track_commit_timestamp = on``, ``pg_xact_commit_timestamp(xmin)``): nothing is added
  to the wire format or the schema. Same machine, same clock. p50/p99 over every batch
  signed in the window;
- **CPU seconds per 1,000 readings** of the workers, the broker (every process of the
  RabbitMQ nodes' sessions) and PostgreSQL (the postmaster and its children), from
  ``/proc/<pid>/stat`` at the window's start and end; the device simulator's too (it is
  on the same 2 cores);
- **acknowledged vs stored**: after the devices stop signing and their outboxes are empty,
  every batch a device saw acknowledged must be stored (``lost`` = 0), each once.
- **where the time goes** (``stage_timings``): per batch signed in the window, signed ->
  handed to the MQTT client (the simulator's own delay) -> PUBACK, -> delivered to a
  bystander subscriber in its own process (``bench/city_watch.py``; Mosquitto only), ->
  the storing transaction's start (``reading.stored_at``) -> its commit; the storing
  transactions' sizes and durations; the simulator's collector pauses. ``CITY_TRACE=FILE``
  writes every batch's stages (JSON).

**The herd** (``--herd [S]``, ``Size.herd_outage_s``): after the window, with every device
connected, the broker is stopped (Mosquitto: SIGTERM, it saves its state; RabbitMQ: every
node killed, SIGKILL) and started again on the same ports with the same configuration ``S``
seconds (default ``HERD_OUTAGE_S``) after the stop, so that every device reconnects at once,
each with its own backoff (``FastDevice.run``: a real device's, 0.5 s doubling to 60 s, +-50
% jitter). For it Mosquitto runs as production configures a single Mosquitto that must
survive its restart: ``persistence true`` and one ingest worker on plain subscriptions
(saved with its session; Mosquitto 2.0 saves no shared subscription, so the bench's two
shared workers would lose, by design, what devices send before a worker subscribes again:
docs/OPERATIONS.md, section 8); RabbitMQ keeps its two AMQP workers. Measured (``herd``):
the outage; from the broker's return until 50 %, 99 % and 100 % of the devices are connected
again; the devices' connect attempts, refusals and failures; the broker's CPU until every
device is back; the batches signed during the outage; and, after the drain, the recovery:
from the broker's return until every batch signed before it is committed (PostgreSQL's
commit timestamps).

The simulator's objects are frozen out of the collector (``gc.freeze``) once every device
is connected: a full collection walking 10,000 devices' clients stopped the loop for
2.4 s, delaying batches signed before it (docs/CAPACITY.md, C9).

``python -m bench.city [devices] [--interval S] [--herd [S]] [rabbitmq] [mosquitto]`` runs
it (``FULL`` by default); ``QUICK`` and ``HERD_QUICK`` are the tests' sizes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import aiomqtt  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from bench.machine import p50_p99  # noqa: E402
from cityedge.fastdevice import FastDevice  # noqa: E402
from cityedge_host.mqtt_client import FailFastClient  # noqa: E402

MISC_S = 5.0  # the MQTT clients' housekeeping period (LightClient)
JITTER = 0.1  # each interval is interval_s * uniform(1 - JITTER, 1 + JITTER)
WORKERS = 2
ENGINES = ("rabbitmq", "mosquitto")
SETTLE_S = 300.0  # the longest wait for the outboxes to empty and everything to be stored
STOP_S = 180.0
HERD_OUTAGE_S = 5.0  # seconds from the broker's stop to its start again (--herd)
HERD_WAIT_S = 600.0  # the longest wait for every device to be connected again
BROKER_EXIT_S = 60.0  # the longest wait for a SIGTERMed Mosquitto to save and exit
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Size:
    devices: int
    interval_s: float  # one batch per device per interval (jittered)
    readings: int  # per batch
    ramp_s: float  # device connections spread over this
    warm_s: float  # steady running before the window
    window_s: float
    herd_outage_s: float = 0.0  # > 0: the broker's outage after the window (Mosquitto)


# a batch of 10 readings per device every 5 minutes (a reading every 30 s): 10,000 devices
# offer 333 readings/s. At a batch a minute 10,000 did not fit this project's 2-core
# machine (docs/CAPACITY.md, C9): 3,000 did; ``python -m bench.city N --interval 60``
FULL = Size(devices=10_000, interval_s=300.0, readings=10, ramp_s=300.0, warm_s=30.0,
            window_s=120.0)
QUICK = Size(devices=6, interval_s=1.0, readings=10, ramp_s=1.0, warm_s=2.0, window_s=4.0)
HERD_QUICK = Size(devices=30, interval_s=1.0, readings=10, ramp_s=2.0, warm_s=1.0,
                  window_s=2.0, herd_outage_s=3.0)


class LightClient(FailFastClient):
    """aiomqtt's client with its housekeeping (``loop_misc``: keepalive pings and their
    timeouts) every ``MISC_S`` instead of every second: 10,000 clients waking every second
    cost the simulator a large share of a core. A ping is at most ``MISC_S`` late against
    a 30 s keepalive (the broker waits 45 s)."""

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(MISC_S)

    async def __aenter__(self) -> LightClient:
        """Connect, counting the device's attempts and noting when each one succeeded (the
        herd's reconnection times)."""
        device = DEVICES.get(self.identifier)
        if device is not None:
            device.attempts += 1
        try:
            await super().__aenter__()
        except aiomqtt.MqttError as e:
            CONNECT_ERRORS[str(e)[:60]] += 1
            raise
        if device is not None:
            device.connected_at.append(time.time())
        return self

    async def publish(self, topic: str, payload: Any = None, *a: Any, **kw: Any) -> None:
        """Publish, noting (for the stage timings) when a reading batch was handed to the
        client and when its PUBACK came back."""
        device = DEVICES.get(self.identifier) if topic.endswith("/up/readings") else None
        if device is None:
            await super().publish(topic, payload, *a, **kw)
            return
        seq = device.stats.published + 1  # the outbox goes out in order, oldest first
        device.published_at.setdefault(seq, time.time())
        await super().publish(topic, payload, *a, **kw)
        device.acked_at.setdefault(seq, time.time())


DEVICES: dict[str, CityDevice] = {}  # by id: the client finds its device's timings
CONNECT_ERRORS: collections.Counter[str] = collections.Counter()  # failed connects, by error


class CityDevice(FastDevice):
    """A fast device that records when it signed each batch, samples at a jittered
    interval from a random phase."""

    mqtt_client = LightClient

    def __init__(self, *a: Any, phase_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.phase_s = phase_s
        self.signed_at: dict[int, float] = {}  # batch seq -> wall clock when signed
        self.published_at: dict[int, float] = {}  # ... when handed to the MQTT client
        self.acked_at: dict[int, float] = {}  # ... when the broker's PUBACK came back
        self.attempts = 0  # connects tried (``LightClient``)
        self.connected_at: list[float] = []  # wall clock of each connection (CONNACK)
        DEVICES[self.id] = self
        self.rand = random.Random(self.id)

    async def _sample(self) -> None:
        await asyncio.sleep(self.phase_s)
        while True:
            if self.sampling:
                t = time.time()
                self.sign_batch()
                self.signed_at[self.writer.seq] = t
            await asyncio.sleep(self.interval_s * self.rand.uniform(1 - JITTER, 1 + JITTER))


class Swarm:
    """Devices in one asyncio loop on a thread; device ``i`` starts at ``delays[i]``."""

    def __init__(self, devices: list[CityDevice], delays: list[float]) -> None:
        self.devices, self.delays = devices, delays
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.lags: list[float] = []  # seconds the loop was late waking a 1 s timer
        self.gc_pauses: list[tuple[float, float, int]] = []  # (wall clock, s, generation)
        self._gc_t0 = 0.0

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_pauses.append((time.time(), time.perf_counter() - self._gc_t0,
                                   info["generation"]))

    async def _watch(self) -> None:
        """How late the loop runs a 1 s timer: a simulator that cannot keep up is late
        (its devices miss their keepalives and the broker drops them)."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(1.0)
            self.lags.append(time.monotonic() - t - 1.0)

    def _run(self) -> None:
        async def one(d: CityDevice, delay: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(d._stop.wait(), delay)
            if not d._stop.is_set():
                await d.run()

        async def main() -> None:
            watch = asyncio.create_task(self._watch())
            await asyncio.gather(*(one(d, t) for d, t in
                                   zip(self.devices, self.delays, strict=True)))
            watch.cancel()

        gc.callbacks.append(self._gc)
        try:
            self.loop.run_until_complete(main())
        except BaseException as e:  # reported by stop()
            self.error = e
        finally:
            gc.callbacks.remove(self._gc)

    def start(self) -> Swarm:
        self.thread.start()
        return self

    def stop_sampling(self) -> None:
        for d in self.devices:
            self.loop.call_soon_threadsafe(setattr, d, "sampling", False)

    def stop(self) -> None:
        for d in self.devices:
            self.loop.call_soon_threadsafe(d.stop)
        self.thread.join(STOP_S)
        if self.thread.is_alive():
            raise RuntimeError("the simulated devices did not stop in %.0f s" % STOP_S)
        if self.error is not None:
            raise self.error


# -- CPU from /proc -------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def cpu_ticks(pids: set[int]) -> dict[int, int]:
    """utime + stime (clock ticks) of each of ``pids`` still running."""
    out = {}
    for pid in pids:
        f = _stat(pid)
        if f is not None:
            out[pid] = int(f[11]) + int(f[12])
    return out


def pids_where(field: int, value: int) -> set[int]:
    """Every process whose stat field ``field`` (1-based: 4 ppid, 6 session) is ``value``,
    and ``value`` itself."""
    out = {value}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None and int(f[field - 3]) == value:
                out.add(int(entry))
    return out


def cpu_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds between two snapshots (processes in both)."""
    return sum(after[p] - before[p] for p in after if p in before) / CLK_TCK


# -- the fleet ------------------------------------------------------------------------


@dataclasses.dataclass
class Ids:
    ids: list[str]
    dirs: list[Path]
    kids: list[str]
    publics: list[str]


def provision_devices(n: int, base: Path, pki: Any) -> Ids:
    """``n`` device directories (key, client certificate from ``pki``, the broker's CA)."""
    from cityedge.fastdevice import provision
    from cityedge_host.crypto import EcSigner, public_sec1

    out = Ids([], [], [], [])
    ca = pki.ca_pem.read_text()
    for i in range(n):
        cn = "urn:dev:mac:0024beff%08x" % i
        signer = EcSigner.generate()
        creds = pki.issue_client(cn, key=signer._key)
        d = provision(base / ("d%05d" % i), device_id=cn, signer=signer,
                      chain_pem=creds.cert_pem.read_text(), ca_pem=ca, fleet_keys=[])
        out.ids.append(cn)
        out.dirs.append(d)
        out.kids.append(signer.kid.hex())
        out.publics.append(public_sec1(signer.public_key).hex())
    return out


def register(url: str, ca_dir: Path, ids: Ids) -> None:
    """The devices, active, with their credentials, straight into the database."""
    from sqlmodel import Session

    from cityedge_fleet.config import FleetLimits, Settings
    from cityedge_fleet.db import make_engine, migrate
    from cityedge_fleet.models import Credential, Device, DeviceState

    settings = Settings(mode="development", database_url=url, ca_dir=ca_dir,
                        ingest_with_serve=False, limits=FleetLimits())
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    now = dt.datetime.now(dt.UTC)
    with Session(engine) as s:
        s.add_all([Device(id=d, serial="CITY-%d" % i, model="m", hardware_class="esp32",
                          state=DeviceState.active) for i, d in enumerate(ids.ids)])
        s.commit()
        s.add_all([Credential(device_id=d, serial="%032x" % i, kid=ids.kids[i],
                              public_key=ids.publics[i], not_before=now,
                              not_after=now + dt.timedelta(days=90), cert_pem="(bench)")
                   for i, d in enumerate(ids.ids)])
        s.commit()
    engine.dispose()


def enable_commit_timestamps(cluster: Any) -> None:
    import psycopg

    with psycopg.connect(cluster.admin_url(), autocommit=True) as c:
        c.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    cluster.stop()
    cluster.start()


def postmaster_pid(cluster: Any) -> int:
    return int((cluster.dir / "data" / "postmaster.pid").read_text().split()[0])


def _sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as c:
        return list(c.execute(query, args).fetchall())


@contextlib.contextmanager
def _broker(engine: str, work: Path, pki: Any, ids: list[str], cns: list[str],
            herd: bool = False) -> Any:
    """(ports the devices use, the broker's pids, extra worker environment; for the herd,
    ``down()`` and ``up()``). ``herd``: Mosquitto saves its state (``persistence true``,
    as production) and the ingest holds plain subscriptions, which it saves with the
    session (module docstring)."""
    from support.mosquitto import Mosquitto
    from support.rabbitmq import RabbitCluster

    if engine == "mosquitto":
        broker = Mosquitto(pki, work / "mosquitto", persistence=herd,
                           extra="max_inflight_messages 0\nmax_queued_messages 0")
        broker.grant(*ids, *cns)
        broker.start()
        assert broker.proc is not None

        def down() -> dict[str, Any]:
            """SIGTERM; waits for the exit (Mosquitto saves its state first)."""
            assert broker.proc is not None
            t = time.monotonic()
            broker.proc.terminate()
            try:
                code = broker.proc.wait(BROKER_EXIT_S)
            except subprocess.TimeoutExpired:
                broker.proc.kill()
                code = broker.proc.wait(10)
            return {"exit_s": round(time.monotonic() - t, 2), "exit_code": code}

        def pids() -> set[int]:
            return {broker.proc.pid} if broker.proc is not None else set()

        env = ({"CITYEDGE_INGEST_SUBSCRIPTION": "plain"} if herd else
               {"CITYEDGE_LIMITS__INGEST_SESSION_EXPIRY_S": "0",
                "CITYEDGE_INGEST_SUBSCRIPTION": "shared"})
        try:
            yield SimpleNamespace(ports=[broker.port], pids=pids, port=broker.port, env=env,
                                  down=down, up=broker.start)
        finally:
            broker.cleanup()
        return
    cluster = RabbitCluster(pki, [*ids, *cns], directory=work / "rmq")
    try:
        cluster.start()  # in the try: nodes that booted are stopped if the cluster fails
        def pids() -> set[int]:
            out: set[int] = set()
            for proc in cluster.procs:
                if proc is not None:
                    out |= pids_where(6, proc.pid)
            out |= {e.pid for e in cluster.epmds}  # an epmd per host
            return out

        def down() -> dict[str, Any]:
            """Every node killed (SIGKILL to each node's process group) at once."""
            t = time.monotonic()
            for i in range(len(cluster.nodes)):
                cluster.kill(i)
            return {"exit_s": round(time.monotonic() - t, 2), "exit_code": "SIGKILL"}

        def up() -> None:
            """Every node started again together (each waits for the others' tables), then
            all listening and online."""
            for i in range(len(cluster.nodes)):
                cluster.start_node(i)
            for i in range(len(cluster.nodes)):
                cluster.wait_listening(i)

        yield SimpleNamespace(
            ports=[n.mqtt_port for n in cluster.nodes], pids=pids,
            port=cluster.nodes[0].mqtt_port, down=down, up=up,
            env={"CITYEDGE_BROKER_ENGINE": "rabbitmq", "CITYEDGE_INGEST_AMQP_NODES": ",".join(
                "127.0.0.1:%d" % n.amqp_port for n in cluster.nodes)})
    finally:
        cluster.stop()


def _watch(b: Any, pki: Any, out: Path) -> subprocess.Popen[bytes] | None:
    """The bystander subscriber (``bench.city_watch``) on Mosquitto (the test broker's
    ``OBSERVER``); None on RabbitMQ (its cluster grants no observer)."""
    from support.mosquitto import OBSERVER

    if "CITYEDGE_BROKER_ENGINE" in b.env:
        return None
    c = pki.service(OBSERVER)
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "city_watch.py"),
                             "127.0.0.1", str(b.port), str(pki.ca_pem), str(c.cert_pem),
                             str(c.key_pem), str(out)])


def _read_watch(path: Path) -> dict[tuple[str, int], float]:
    """(device, seq) -> when the bystander got it: a device's k-th delivery is its batch
    k (one at a time, in order; a copy sent again after a reconnect counts once: the
    first arrival of each is kept, which may shift a device that resent)."""
    out: dict[tuple[str, int], float] = {}
    count: dict[str, int] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        t, _, device = line.partition(" ")
        k = count[device] = count.get(device, 0) + 1
        out[(device, k)] = float(t)
    return out


def _checkpoints(cluster: Any, w0: float, w1: float) -> list[str]:
    """PostgreSQL's checkpoint log lines (log_checkpoints is on by default in 15)."""
    log = cluster.dir / "log"
    if not log.exists():
        return []
    return [line for line in log.read_text(errors="replace").splitlines()
            if "checkpoint" in line]


def _pcts(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)
    p50, p99 = p50_p99(xs)
    return {"n": len(xs), "p50": round(p50, 3), "p99": round(p99, 3), "max": round(xs[-1], 3)}


def stage_timings(url: str, devices: list[CityDevice], seen: dict[tuple[str, int], float],
                  w0: float, w1: float, gc_pauses: list[tuple[float, float, int]],
                  checkpoints: list[str]) -> dict[str, Any]:
    """Where the time from signing to the committed row goes, for the batches signed in
    the window: signed -> handed to the MQTT client (the simulator) -> delivered to the
    bystander subscriber (the broker) / PUBACK -> the storing transaction's start
    (``reading.stored_at`` is its ``now()``: the broker's delivery to the worker, the
    worker's queue and grouping) -> its commit (the database)."""
    rows = _sql(url, "SELECT device_id, batch_seq, extract(epoch FROM min(stored_at)), "
                "extract(epoch FROM max(pg_xact_commit_timestamp(xmin))), min(xmin::text) "
                "FROM reading GROUP BY device_id, batch_seq")
    tx = {(d, int(s)): (float(a), float(c), x) for d, s, a, c, x in rows}
    per: list[dict[str, float]] = []
    for d in devices:
        for s, t in d.signed_at.items():
            if not (w0 <= t <= w1) or (d.id, s) not in tx:
                continue
            start, commit, _x = tx[(d.id, s)]
            pub = d.published_at.get(s, float("nan"))
            per.append({"total": commit - t, "sim": pub - t,
                        "puback": d.acked_at.get(s, float("nan")) - pub,
                        "broker": seen.get((d.id, s), float("nan")) - pub,
                        "to_tx": start - pub, "tx": commit - start,
                        "handed": commit - pub, "signed": t})
    out: dict[str, Any] = {k: _pcts([p[k] for p in per if p[k] == p[k]])
                           for k in ("total", "sim", "puback", "broker", "to_tx", "tx",
                                     "handed")}
    per.sort(key=lambda p: p["total"])
    tail = per[-max(1, len(per) // 100):] if per else []
    out["slowest_1pct"] = [{k: round(v, 3) for k, v in p.items()} for p in tail]
    # the storing transactions whose commits fall in the window
    txs = _sql(url, "SELECT extract(epoch FROM min(stored_at)), extract(epoch FROM "
               "max(pg_xact_commit_timestamp(xmin))), count(DISTINCT (device_id, batch_seq)) "
               "FROM reading GROUP BY xmin::text HAVING max(pg_xact_commit_timestamp(xmin)) "
               "BETWEEN to_timestamp(%s) AND to_timestamp(%s) ORDER BY 2", w0, w1)
    out["transactions"] = {"n": len(txs),
                           "batches": _pcts([float(n) for _a, _c, n in txs]),
                           "duration": _pcts([float(c) - float(a) for a, c, _n in txs])}
    out["gc_pauses_in_window"] = {"n": len(gc_pauses),
                                  "by_generation": {g: _pcts([p for _t, p, gg in gc_pauses
                                                              if gg == g]) for g in (0, 1, 2)}}
    out["checkpoints"] = checkpoints
    trace = os.environ.get("CITY_TRACE")
    if trace:
        Path(trace).write_text(json.dumps({"per": per, "transactions": txs,
                                           "gc": gc_pauses, "w0": w0, "w1": w1,
                                           "checkpoints": checkpoints},
                                          default=str))
    return out


def _fraction_back(xs: list[float], q: float) -> float:
    """The time by which a fraction ``q`` of ``xs`` (sorted) had come: its ceil(q n)-th."""
    return xs[max(1, math.ceil(q * len(xs))) - 1]


def herd(b: Any, devices: list[CityDevice], swarm: Swarm, outage_s: float,
         say: Any = print) -> dict[str, Any]:
    """The broker stopped (``b.down``) and started again ``outage_s`` after the stop, every
    device connected; returns once every device is connected again (or ``HERD_WAIT_S``).
    Times are from the broker's return (``t_back``, wall clock): when its port accepted a
    connection again, or a device's reconnection if one came first."""
    first = [(d.attempts, d.stats.connect_failures, d.stats.connects) for d in devices]
    errors0 = collections.Counter(CONNECT_ERRORS)
    unacked = sum(len(d.outbox) for d in devices)  # signed, not acknowledged yet
    lag0 = len(swarm.lags)
    t_term = time.time()
    stopped = b.down()
    t_exit = time.time()
    time.sleep(max(0.0, outage_s - (t_exit - t_term)))
    b.up()
    t_up = time.time()
    pids = b.pids()
    me = {os.getpid()}
    cpu0, sim0 = cpu_ticks(pids), cpu_ticks(me)
    last_t, last = time.monotonic(), cpu0
    peak = 0.0  # the broker's busiest second (cores)

    def back(d: CityDevice) -> float | None:
        ts = [t for t in d.connected_at if t > t_exit]
        return min(ts) if ts else None

    deadline = time.monotonic() + HERD_WAIT_S
    while time.monotonic() < deadline and any(back(d) is None for d in devices):
        time.sleep(0.25)
        now, ticks = time.monotonic(), cpu_ticks(pids)
        if now - last_t >= 1.0:
            peak = max(peak, cpu_delta(last, ticks) / (now - last_t))
            last_t, last = now, ticks
    t_all = time.time()
    cpu1, sim1 = cpu_ticks(pids), cpu_ticks(me)
    firsts = [t for t in (back(d) for d in devices) if t is not None]
    t_back = min([t_up, *firsts])
    since = sorted(t - t_back for t in firsts)
    wall = t_all - t_back
    lags = swarm.lags[lag0:] or [0.0]
    out: dict[str, Any] = {
        "broker_exit_s": stopped["exit_s"], "broker_exit_code": stopped["exit_code"],
        "outage_s": round(t_back - t_term, 2),
        "unacked_at_outage": unacked,
        "signed_in_outage": sum(1 for d in devices for t in d.signed_at.values()
                                if t_term <= t <= t_back),
        "reconnected": len(firsts),
        "back_50_s": round(_fraction_back(since, 0.5), 2) if since else None,
        "back_99_s": round(_fraction_back(since, 0.99), 2) if since else None,
        "back_100_s": round(since[-1], 2) if len(since) == len(devices) else None,
        "attempts": sum(d.attempts - a for d, (a, _f, _c) in zip(devices, first, strict=True)),
        "connect_failures": sum(d.stats.connect_failures - f
                                for d, (_a, f, _c) in zip(devices, first, strict=True)),
        "connects": sum(d.stats.connects - c for d, (_a, _f, c) in zip(devices, first,
                                                                      strict=True)),
        "broker_cpu_s": round(cpu_delta(cpu0, cpu1), 2),
        "broker_cores": round(cpu_delta(cpu0, cpu1) / wall, 2) if wall > 0 else None,
        "broker_peak_cores": round(peak, 2),
        "simulator_cpu_s": round(cpu_delta(sim0, sim1), 2),
        "loop_lag_max_s": round(max(lags), 2),
        "connect_errors": dict((CONNECT_ERRORS - errors0).most_common(5)),
        "t_term": t_term, "t_back": t_back,
    }
    say("  herd: stopped at %s UTC, broker down %.1f s; %d of %d devices back, 100 %% after "
        "%s s" % (dt.datetime.fromtimestamp(t_term, dt.UTC).strftime("%H:%M:%S"),
                  out["outage_s"], len(firsts), len(devices), out["back_100_s"]))
    return out


def one_engine(engine: str, size: Size, cluster: Any, base: Path, pki: Any, ids: Ids,
               say: Any = print) -> dict[str, Any]:
    from cityedge_fleet.config import FleetLimits, Settings

    from support.faults import IngestProc

    herding = size.herd_outage_s > 0
    work = Path(tempfile.mkdtemp(prefix="%s-" % engine, dir=base))
    work.chmod(0o755)
    url = cluster.new_database()
    register(url, base / "ca", ids)
    # the herd on Mosquitto: one worker on plain subscriptions (the module docstring)
    cns = ["fleet-ingest"] + ["fleet-ingest-%d" % k for k in range(2, 1 + (
        1 if herding and engine == "mosquitto" else WORKERS))]
    herd_out: dict[str, Any] | None = None
    t_boot = time.monotonic()
    with _broker(engine, work, pki, ids.ids, cns, herd=herding) as b:
        boot_s = time.monotonic() - t_boot
        settings = Settings(mode="development", database_url=url, ca_dir=base / "ca",
                            mqtt_port=b.port, mqtt_ca_file=pki.ca_pem,
                            audit_key_file=base / "audit.key",
                            command_key_file=base / "cmd.key", limits=FleetLimits())
        rig = SimpleNamespace(pki=pki, dir=work, settings=settings, broker=b,
                              worker_db_url=lambda cn: url + "?application_name=" + cn)
        workers: list[IngestProc] = []
        swarm: Swarm | None = None
        watch: subprocess.Popen[bytes] | None = None
        watch_file = work / "watch.txt"
        try:
            workers = [IngestProc(rig, cn, b.env).start() for cn in cns]
            watch = _watch(b, pki, watch_file)
            rand = random.Random(engine)
            devices = [CityDevice(d, "127.0.0.1", b.ports[i % len(b.ports)],
                                  interval_s=size.interval_s, readings=size.readings,
                                  phase_s=rand.uniform(0, size.interval_s))
                       for i, d in enumerate(ids.dirs)]
            delays = [rand.uniform(0, size.ramp_s) for _ in devices]
            t0 = time.monotonic()
            swarm = Swarm(devices, delays).start()
            # every device connected (or the ramp long over), then the warm-up
            deadline = t0 + size.ramp_s + 120.0
            while time.monotonic() < deadline and any(d.stats.connects == 0 for d in devices):
                time.sleep(0.5)
            connected_s = time.monotonic() - t0
            connected = sum(1 for d in devices if d.stats.connects > 0)
            say("  %s: %d of %d devices connected in %.0f s" % (engine, connected,
                                                               len(devices), connected_s))
            # the 10,000 devices' objects (clients, TLS sessions, keys) are long-lived: out
            # of the collector's reach once, so a full collection does not walk them again
            # (one took 2.4 s in the window, the simulator's loop stopped meanwhile, batches
            # signed before it published after it: docs/CAPACITY.md, C9)
            gc.collect()
            gc.freeze()
            time.sleep(size.warm_s)
            pg_pids = pids_where(4, postmaster_pid(cluster))
            groups = {"workers": {w.proc.pid for w in workers if w.proc is not None},
                      "broker": b.pids(), "postgresql": pg_pids, "devices": {os.getpid()}}
            before = {k: cpu_ticks(v) for k, v in groups.items()}
            lag0, conn0 = len(swarm.lags), sum(d.stats.connects for d in devices)
            w0 = time.time()
            time.sleep(size.window_s)
            w1 = time.time()
            after = {k: cpu_ticks(v) for k, v in groups.items()}
            lags = sorted(swarm.lags[lag0:]) or [0.0]
            reconnects = sum(d.stats.connects for d in devices) - conn0
            cpu = {k: cpu_delta(before[k], after[k]) for k in groups}
            if herding:
                dups0 = _sql(url, "SELECT count(*) FROM ingest_event "
                             "WHERE status = 'duplicate'")[0][0]
                herd_out = herd(b, devices, swarm, size.herd_outage_s, say)
                herd_out["duplicate_events_before"] = dups0
            # drain: nothing more signed; every outbox acknowledged; everything stored
            swarm.stop_sampling()
            deadline = time.monotonic() + SETTLE_S
            while time.monotonic() < deadline and any(d.outbox for d in devices):
                time.sleep(0.5)
            unsent = sum(len(d.outbox) for d in devices)
            acked = {d.id: d.stats.published for d in devices}
            want = sum(acked.values())
            while time.monotonic() < deadline:
                n = _sql(url, "SELECT count(DISTINCT (device_id, batch_seq)) FROM reading")[0][0]
                if n >= want:
                    break
                time.sleep(1.0)
            swarm_gc = [g for g in swarm.gc_pauses if w0 <= g[0] <= w1]
            swarm.stop()
            swarm = None
            gc.unfreeze()
        finally:
            if swarm is not None:
                with contextlib.suppress(Exception):
                    swarm.stop()
            for w in workers:
                w.stop()
            if watch is not None:
                watch.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    watch.wait(10)
    seen = _read_watch(watch_file)
    shutil.rmtree(work, ignore_errors=True)
    rows = _sql(url, "SELECT device_id, batch_seq, count(*), "
                "extract(epoch FROM max(pg_xact_commit_timestamp(xmin))) "
                "FROM reading GROUP BY device_id, batch_seq")
    stored = {(d, s): (int(n), float(t)) for d, s, n, t in rows}
    lost = sum(1 for d, n in acked.items() for s in range(1, n + 1) if (d, s) not in stored)
    twice = sum(1 for n, _t in stored.values() if n != size.readings)
    in_window = _sql(url, "SELECT count(*) FROM reading WHERE pg_xact_commit_timestamp(xmin) "
                     "BETWEEN to_timestamp(%s) AND to_timestamp(%s)", w0, w1)[0][0]
    lat = sorted(stored[(d.id, s)][1] - t for d in devices for s, t in d.signed_at.items()
                 if w0 <= t <= w1 and (d.id, s) in stored)
    p50, p99 = p50_p99(lat) if lat else (float("nan"), float("nan"))
    stages = stage_timings(url, devices, seen, w0, w1, swarm_gc, _checkpoints(cluster, w0, w1))
    per_k = {k: (1000.0 * v / in_window if in_window else float("nan")) for k, v in cpu.items()}
    dups = _sql(url, "SELECT count(*) FROM ingest_event WHERE status = 'duplicate'")[0][0]
    if herd_out is not None:
        # every batch signed before the broker came back, committed (PostgreSQL's clock)
        t_back = herd_out["t_back"]
        before_back = [(d.id, s) for d in devices for s, t in d.signed_at.items()
                       if t <= t_back]
        missing = sum(1 for k in before_back if k not in stored)
        herd_out["signed_before_back"] = len(before_back)
        herd_out["recovery_s"] = (None if missing or not before_back else round(
            max(0.0, max(stored[k][1] for k in before_back) - t_back), 2))
        herd_out["duplicate_events"] = dups - herd_out.pop("duplicate_events_before")
    return {
        "engine": engine, "devices": len(devices), "connected": connected,
        "connected_s": round(connected_s, 1), "broker_boot_s": round(boot_s, 1),
        "connect_failures": sum(d.stats.connect_failures for d in devices),
        "reconnects_in_window": reconnects,
        "loop_lag_p99_s": round(p50_p99(lags)[1], 3), "loop_lag_max_s": round(lags[-1], 3),
        "offered_readings_per_s": len(devices) * size.readings / size.interval_s,
        "readings_per_s": in_window / (w1 - w0), "window_s": round(w1 - w0, 1),
        "latency_batches": len(lat), "p50_s": p50, "p99_s": p99,
        "max_s": lat[-1] if lat else float("nan"),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_s_per_1000_readings": {k: round(v, 3) for k, v in per_k.items()},
        "acknowledged": want, "stored": len(stored), "unsent": unsent, "lost": lost,
        "stored_twice": twice,
        "duplicate_events": dups, "workers": len(cns), "herd": herd_out,
        "stages": stages,
    }


def run(size: Size = FULL, engines: tuple[str, ...] = ENGINES,
        say: Any = print) -> dict[str, Any]:
    from cityedge_fleet.ca import init_ca

    from support.mosquitto import TestPKI
    from support.pg import pg_cluster

    out: dict[str, Any] = {"size": dataclasses.asdict(size),
                           "workers": WORKERS,
                           "cores": os.cpu_count(), "engines": {}}
    # the devices' files on tmpfs: 10,000 directories of small files written durably
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="cityedge-bench-city-",
                                     dir=shm if shm.is_dir() else None) as d, \
            pg_cluster(fsync=True) as cluster:
        base = Path(d)
        base.chmod(0o755)
        enable_commit_timestamps(cluster)
        init_ca(base / "root", base / "ca")
        pki = TestPKI(base / "pki")
        t = time.monotonic()
        ids = provision_devices(size.devices, base / "devices", pki)
        out["provision_s"] = round(time.monotonic() - t, 1)
        for engine in engines:
            out["engines"][engine] = one_engine(engine, size, cluster, base, pki, ids, say)
    return out


NAMES = {"rabbitmq": "RabbitMQ 3.10, 3 nodes (quorum queue, AMQP ingest)",
         "mosquitto": "Mosquitto, 1 node (shared subscription)"}


def report(r: dict[str, Any]) -> None:
    s = r["size"]
    print("\nCity scale: %d devices, a batch of %d readings every %.0f s (+-%d%%) each, "
          "PostgreSQL fsync on, %s cores:"
          % (s["devices"], s["readings"], s["interval_s"], JITTER * 100,
             r["cores"]))
    for engine, e in r["engines"].items():
        name = NAMES.get(engine, engine)
        if e.get("herd"):
            name = name.replace("shared subscription", "plain subscriptions, saved")
        print("  %s, %d ingest workers" % (name, e.get("workers", r["workers"])))
        print("    connected %d of %d in %.0f s; offered %.0f readings/s; stored %.0f "
              "readings/s over %.0f s"
              % (e["connected"], e["devices"], e["connected_s"], e["offered_readings_per_s"],
                 e["readings_per_s"], e["window_s"]))
        print("    signing -> committed row: p50 %.3f s, p99 %.3f s, max %.3f s (%d batches; "
              "target p99 < 1 s)" % (e["p50_s"], e["p99_s"], e["max_s"], e["latency_batches"]))
        print("    simulator loop late by p99 %.2f s, max %.2f s; %d reconnects in the window"
              % (e["loop_lag_p99_s"], e["loop_lag_max_s"], e["reconnects_in_window"]))
        print("    CPU s per 1,000 readings: " + ", ".join(
            "%s %.3f" % kv for kv in e["cpu_s_per_1000_readings"].items()))
        print("    acknowledged %d batches, stored %d, lost %d, stored twice %d, "
              "duplicates classified %d" % (e["acknowledged"], e["stored"], e["lost"],
                                            e["stored_twice"], e["duplicate_events"]))
        h = e.get("herd")
        if h:
            report_herd(e, h)
        st = e.get("stages", {})
        names = {"sim": "signed -> handed to MQTT (simulator)",
                 "puback": "handed -> PUBACK", "broker": "handed -> bystander subscriber",
                 "to_tx": "handed -> storing transaction starts", "tx": "transaction",
                 "handed": "handed -> committed (no simulator stage)"}
        for k, name in names.items():
            if st.get(k):
                print("      %-40s p50 %.3f s, p99 %.3f s, max %.3f s"
                      % (name, st[k]["p50"], st[k]["p99"], st[k]["max"]))
        if st.get("gc_pauses_in_window"):
            g2 = st["gc_pauses_in_window"]["by_generation"][2]
            print("      simulator GC pauses in the window: %d; generation 2: %s"
                  % (st["gc_pauses_in_window"]["n"], g2))


def report_herd(e: dict[str, Any], h: dict[str, Any]) -> None:
    if e["engine"] == "mosquitto":
        print("    herd (after the window; Mosquitto persistence on, %d ingest worker%s on "
              "plain subscriptions):" % (e["workers"], "" if e["workers"] == 1 else "s"))
    else:
        print("    herd (after the window; every node kill -9 and started again, %d AMQP "
              "ingest workers):" % e["workers"])
    print("      broker stopped -> exited in %.2f s (code %s); down until its return: %.2f s; "
          "%d batches signed in the outage, %d unacknowledged at the stop"
          % (h["broker_exit_s"], h["broker_exit_code"], h["outage_s"], h["signed_in_outage"],
             h["unacked_at_outage"]))
    print("      connected again: %d of %d; from the broker's return: 50 %% %s s, 99 %% %s s, "
          "100 %% %s s" % (h["reconnected"], e["devices"], h["back_50_s"], h["back_99_s"],
                          h["back_100_s"]))
    print("      devices' connect attempts %d (refused or failed %d), connections %d, failures "
          "%d (FastStats: the drop counts one)" % (h["attempts"], h["attempts"] - h["connects"],
                                                   h["connects"], h["connect_failures"]))
    print("      failed connects by error: %s" % (h["connect_errors"] or "none"))
    print("      broker CPU until every device was back: %.2f s, %s cores on average, "
          "busiest second %.2f cores; simulator %.2f CPU s, its loop late by up to %.2f s"
          % (h["broker_cpu_s"], h["broker_cores"], h["broker_peak_cores"],
             h["simulator_cpu_s"], h["loop_lag_max_s"]))
    print("      recovery (broker's return -> every batch signed before it committed): %s s "
          "(%d batches); duplicates classified since the outage %d"
          % (h.get("recovery_s"), h.get("signed_before_back", 0),
             h.get("duplicate_events", 0)))


if __name__ == "__main__":
    args = sys.argv[1:]
    size = FULL
    if args and args[0].isdigit():
        size = dataclasses.replace(size, devices=int(args[0]))
    if "--interval" in args:
        size = dataclasses.replace(size, interval_s=float(args[args.index("--interval") + 1]))
    if "--quick" in args:
        size = QUICK
    only = tuple(e for e in ENGINES if e in args) or ENGINES
    if "--herd" in args:
        at = args.index("--herd") + 1
        outage = HERD_OUTAGE_S
        with contextlib.suppress(IndexError, ValueError):
            outage = float(args[at])
        size = dataclasses.replace(size, herd_outage_s=outage)
    report(run(size, only))
    os._exit(0)
