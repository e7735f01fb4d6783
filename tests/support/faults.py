"""Fault injection against the real fleet: fast devices (``cityedge.fastdevice``, real mTLS
MQTT) -> Mosquitto -> several ``cityedge fleet ingest`` processes sharing the stream ->
PostgreSQL, with the enrollment API in this process.

``FaultRig`` builds it (optionally with a ``LinkProxy`` between the devices and the broker
and one between the ingest workers and the database); each fault function breaks one
thing while the devices stream, ends the fault, and returns a ``FaultResult``:

- ``acknowledged``: batches the broker acknowledged to a device (PUBACK: the device
  forgets them) — after the run every signed batch is acknowledged;
- ``lost``: acknowledged batches with no stored readings (must be 0);
- ``duplicates_stored``: batches whose readings are stored more than once (must be 0);
- ``duplicate_events``: copies the chain classified as ``duplicate`` (a redelivery after
  a commit whose acknowledgement was lost, or a device resending after a lost PUBACK);
- ``recovery_s``: from the end of the fault (a killed process: from the kill) until
  every batch signed up to then is stored. The fleet recovers by itself: the only action
  after a fault is what a service manager does (start a killed worker again).

``tests/fleet/test_fleet_faults.py`` runs each at a small size (``make test``);
``python -m support.chaos`` (``make chaos``) at a large one and prints the table. The
broker is a Mosquitto of the rig's own; ``support.faults_cluster.ClusterFaultRig`` puts a
three-node RabbitMQ cluster there instead (the hooks ``_world``, ``_broker_proxy``,
``device_port``, ``_start_workers`` and the rig's ``ingest_env``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from cityedge.fastdevice import FastDevice
from cityedge_fleet.app import create_app
from cityedge_fleet.config import Settings

from support.fastfleet import DeviceLoop, enroll_fast
from support.fleet import Api
from support.fleet_world import fleet_world
from support.linkproxy import LinkProxy
from support.mosquitto import TestPKI
from support.pg import PgCluster
from support.procs import stop

READINGS = 3  # readings per batch
SETTLE_S = 120.0  # the longest wait for a fleet to store what was acknowledged
INGEST_READY_S = 30.0


@dataclass
class FaultResult:
    fault: str
    acknowledged: int = 0
    stored: int = 0
    lost: int = 0
    duplicates_stored: int = 0
    duplicate_events: int = 0
    recovery_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        return "%-38s | %8d | %6d | %10d | %10d | %8.2f s" % (
            self.fault, self.acknowledged, self.lost, self.duplicates_stored,
            self.duplicate_events, self.recovery_s)


HEADER = "%-38s | %8s | %6s | %10s | %10s | %10s" % (
    "fault", "acked", "lost", "dup stored", "dup events", "recovery")


def check_nothing_lost(r: FaultResult) -> None:
    """A fault's verdict in every test of it: the fleet took batches, and every batch
    acknowledged to a device is stored, exactly once (the row is printed for ``-s``)."""
    print("\n" + HEADER + "\n" + r.row(), r.notes)
    assert r.acknowledged > 0
    assert r.lost == 0
    assert r.duplicates_stored == 0
    assert r.stored == r.acknowledged  # every acknowledged batch, once


class IngestProc:
    """``cityedge fleet ingest`` in a process of its own, as systemd runs it: it says
    READY=1 on ``NOTIFY_SOCKET`` once its shared subscriptions are granted."""

    def __init__(self, rig: Any, cn: str, env: dict[str, str] | None = None) -> None:
        """``rig``: a ``FaultRig`` or anything with its ``pki``, ``dir``, ``settings``,
        ``broker`` and ``worker_db_url`` (``bench/scaling.py``)."""
        self.rig, self.cn, self.extra_env = rig, cn, env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = rig.dir / ("%s.log" % cn)
        self.starts = 0
        self.ready_s = 0.0  # seconds from exec to READY=1, the last start

    def start(self) -> IngestProc:
        rig, creds = self.rig, self.rig.pki.service(self.cn)
        sock_path = rig.dir / ("%s.notify" % self.cn)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(INGEST_READY_S)
        s = rig.settings
        env = dict(os.environ, CITYEDGE_MODE="development",
                   CITYEDGE_DATABASE_URL=rig.worker_db_url(self.cn),
                   CITYEDGE_CA_DIR=str(s.ca_dir), CITYEDGE_MQTT_HOST="127.0.0.1",
                   CITYEDGE_MQTT_PORT=str(rig.broker.port),
                   CITYEDGE_MQTT_CA_FILE=str(s.mqtt_ca_file),
                   CITYEDGE_MQTT_CERT_FILE=str(creds.cert_pem),
                   CITYEDGE_MQTT_KEY_FILE=str(creds.key_pem), CITYEDGE_MQTT_CLIENT_ID=self.cn,
                   CITYEDGE_AUDIT_KEY_FILE=str(s.audit_key_file),
                   CITYEDGE_COMMAND_KEY_FILE=str(s.command_key_file),
                   CITYEDGE_LIMITS__INGEST_GROUP_MAX_S="0.05",
                   CITYEDGE_LIMITS__INGEST_RETRY_S="0.05",
                   CITYEDGE_LIMITS__INGEST_DOWN_RETRY_MAX_S="1.0",
                   CITYEDGE_INGEST_SUBSCRIPTION=getattr(rig, "subscription", "shared"),
                   NOTIFY_SOCKET=str(sock_path))
        env.update(getattr(rig, "ingest_env", dict)())  # the broker engine's (a cluster)
        env.update(self.extra_env)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "fleet",
                                          "ingest"], env=env, stdout=out, stderr=out)
        self.starts += 1
        t0 = time.monotonic()
        try:
            deadline = time.monotonic() + INGEST_READY_S
            while time.monotonic() < deadline:
                if sock.recv(4096).startswith(b"READY=1"):
                    self.ready_s = time.monotonic() - t0
                    return self
        except TimeoutError:
            pass
        finally:
            sock.close()
        raise AssertionError("ingest %s did not subscribe: %s" % (self.cn,
                                                                  self.log.read_text()[-2000:]))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (it cannot reconnect) until ``resume``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a paused one too
            stop(self.proc)


class FaultRig:
    def __init__(self, pki: TestPKI, pg: PgCluster, *, devices: int, workers: int = 2,
                 interval_s: float = 0.2, skew_s: float = 0.0, broker_proxy: bool = False,
                 db_proxy: bool = False, persistence: bool = True,
                 subscription: str | None = None) -> None:
        self.pki, self.pg = pki, pg
        self.n_devices, self.n_workers = devices, workers
        # the ingest's subscriptions: plain for one worker (production's default), shared
        # for several (CITYEDGE_INGEST_SUBSCRIPTION)
        self.subscription = subscription or ("plain" if workers == 1 else "shared")
        self.interval_s, self.skew_s = interval_s, skew_s
        self.db_url = pg.new_database()
        self.db_proxy = LinkProxy(pg.port).start() if db_proxy else None
        self.dir, self.broker, self.settings = self._world(persistence)
        self.broker_proxy: Any = self._broker_proxy() if broker_proxy else None
        self.workers: list[IngestProc] = []
        self.devices: list[FastDevice] = []
        self.loop: DeviceLoop | None = None
        self._stack = contextlib.ExitStack()

    # -- building (the broker engine's hooks: ``faults_cluster.ClusterFaultRig``) ------

    def _world(self, persistence: bool) -> tuple[Path, Any, Settings]:
        """The fleet's directory, broker and settings: a Mosquitto of the rig's own."""
        w = fleet_world(self.pki, self.db_url, "cityedge-fault-", persistence=persistence,
                        ingest_group_max_s=0.05, enroll_burst=100_000)
        return w.dir, w.broker, w.settings

    def _broker_proxy(self) -> Any:
        """What stands between the devices and the broker (``device_port``)."""
        return LinkProxy(self.broker.port).start()

    def device_host(self, i: int) -> str:
        """Where device ``i`` connects (on a cluster of several hosts, its node's)."""
        del i
        return "127.0.0.1"

    def device_port(self, i: int) -> int:
        """The port device ``i`` (0-based) connects to."""
        return self.broker_proxy.port if self.broker_proxy is not None else self.broker.port

    def worker_db_url(self, cn: str) -> str:
        port = self.db_proxy.port if self.db_proxy is not None else self.pg.port
        url = self.db_url.replace(":%d/" % self.pg.port, ":%d/" % port)
        return url + "?application_name=" + cn

    def __enter__(self) -> FaultRig:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        app = create_app(self.settings, init_db=True)
        self._stack.callback(app.state.engine.dispose)
        self._stack.callback(app.state.broker_access.close)
        client = self._stack.enter_context(TestClient(app))
        fleet = SimpleNamespace(api=Api(client, self.settings), world=self.dir, pki=self.pki,
                                broker=self.broker)
        now = time.time
        skew = self.skew_s
        for i in range(self.n_devices):
            dev, _first = enroll_fast(fleet, i + 1, self.interval_s)  # type: ignore[arg-type]
            clock: Callable[[], float] = (lambda: now() + skew) if skew else time.time
            self.devices.append(FastDevice(dev.dir, self.device_host(i), self.device_port(i),
                                           interval_s=self.interval_s, readings=READINGS,
                                           clock=clock))
        cns = ["fleet-ingest"] + ["fleet-ingest-%d" % k for k in range(2, self.n_workers + 1)]
        self.broker.grant(*cns)
        self.workers = self._start_workers(cns)

    def _start_workers(self, cns: list[str]) -> list[IngestProc]:
        return [IngestProc(self, cn).start() for cn in cns]

    def start_devices(self) -> None:
        self.loop = DeviceLoop(self.devices).start()

    def close(self) -> None:
        if self.loop is not None and self.loop.thread.is_alive():
            with contextlib.suppress(Exception):
                self.loop.stop()
        for w in self.workers:
            w.stop()
        self._stack.close()
        for proxy in (self.broker_proxy, self.db_proxy):
            if proxy is not None:
                proxy.close()
        self.broker.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    # -- observing -------------------------------------------------------------------

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, connect_timeout=5) as c:
            return list(c.execute(query, args).fetchall())

    def stored(self) -> dict[str, dict[int, int]]:
        """device -> batch seq -> readings stored."""
        out: dict[str, dict[int, int]] = {}
        for device, seq, n in self.sql("SELECT device_id, batch_seq, count(*) FROM reading "
                                       "GROUP BY device_id, batch_seq"):
            out.setdefault(device, {})[seq] = n
        return out

    def signed(self) -> dict[str, int]:
        return {d.id: d.stats.signed for d in self.devices}

    def wait_stored(self, upto: dict[str, int], timeout: float = SETTLE_S,
                    given_up: frozenset[tuple[str, int]] = frozenset()) -> float | None:
        """Seconds until every batch ``1..upto[device]`` is stored (None: not in time),
        but those in ``given_up`` ((device, seq): see ``holes``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                have = self.stored()
            except psycopg.OperationalError:
                have = {}
            if all(all(s in have.get(d, {}) or (d, s) in given_up for s in range(1, n + 1))
                   for d, n in upto.items()):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def holes(self) -> frozenset[tuple[str, int]]:
        """(device, seq) of the batches missing below a batch of the same device that is
        stored: after a whole settle time these are lost, not late (the tail above the
        last stored one may still be on its way, and is waited for)."""
        out = set()
        for d, have in self.stored().items():
            out.update((d, s) for s in range(1, max(have)) if s not in have)
        return frozenset(out)

    def steady(self, batches: int = 3) -> None:
        """Wait until every device has ``batches`` batches stored (the fleet runs)."""
        assert self.wait_stored(dict.fromkeys(self.signed(), batches), 60) is not None, \
            "the fleet never stored %d batches of every device" % batches

    def finish(self, result: FaultResult, settle_s: float = SETTLE_S,
               given_up: frozenset[tuple[str, int]] = frozenset()) -> FaultResult:
        """Stop signing, wait for every signed batch to be acknowledged and stored (up to
        ``settle_s`` for the storing; not again for those in ``given_up``, already waited
        for that long), and count what was lost or stored twice (a batch of ``given_up``
        stored by then counts as stored)."""
        assert self.loop is not None
        for d in self.devices:
            self.loop.call(lambda d=d: setattr(d, "sampling", False))
        deadline = time.monotonic() + SETTLE_S
        while any(d.outbox for d in self.devices) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.loop.stop()
        acked = {d.id: d.stats.published for d in self.devices}
        assert all(not d.outbox for d in self.devices), "devices still hold batches: %s" % [
            (d.id, len(d.outbox), d.stats.connects, d.stats.connect_failures,
             d.stats.last_error) for d in self.devices if d.outbox]
        self.wait_stored(acked, settle_s, given_up)
        have = self.stored()
        result.acknowledged = sum(acked.values())
        result.stored = sum(len(v) for v in have.values())
        result.lost = sum(1 for d, n in acked.items() for s in range(1, n + 1)
                          if s not in have.get(d, {}))
        result.duplicates_stored = sum(1 for v in have.values() for n in v.values()
                                       if n != READINGS)
        result.duplicate_events = self.sql(
            "SELECT count(*) FROM ingest_event WHERE status = 'duplicate'")[0][0]
        result.notes["worker_starts"] = [w.starts for w in self.workers]
        return result

    def recover(self, result: FaultResult, since: float) -> None:
        """Record how long after ``since`` (monotonic) everything signed by now is stored."""
        assert self.wait_stored(self.signed()) is not None, \
            "%s: the fleet did not recover" % result.fault
        result.recovery_s = time.monotonic() - since


# -- the faults ------------------------------------------------------------------------


def worker_killed(rig: FaultRig) -> FaultResult:
    """Two workers share the stream; one is ``kill -9``ed while the database shows it in
    a transaction; the service manager starts it again."""
    r = FaultResult("ingest worker kill -9 mid-transaction")
    rig.start_devices()
    rig.steady()
    victim = rig.workers[0]
    deadline = time.monotonic() + 30
    in_tx = False
    while time.monotonic() < deadline and not in_tx:
        in_tx = bool(rig.sql("SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                             "AND xact_start IS NOT NULL AND state <> 'idle'", victim.cn))
    assert in_tx, "never saw the worker in a transaction"
    victim.kill()
    since = time.monotonic()
    r.notes["killed_in_transaction"] = in_tx
    time.sleep(2.0)  # as the unit's RestartSec=2
    victim.start()
    r.notes["restart_ready_s"] = round(victim.ready_s, 2)
    rig.recover(r, since)
    return rig.finish(r)


def database_restarted(rig: FaultRig, down_s: float = 2.0) -> FaultResult:
    """PostgreSQL crashes (``pg_ctl stop -m immediate``) under load and comes back."""
    r = FaultResult("PostgreSQL crash + restart")
    rig.start_devices()
    rig.steady()
    rig.pg.stop("immediate")
    time.sleep(down_s)
    rig.pg.start()
    since = time.monotonic()
    rig.recover(r, since)
    return rig.finish(r)


def device_link(rig: FaultRig, down_s: float = 2.0) -> FaultResult:
    """Between devices and broker: the link cut (connections reset, refused), then
    garbled bytes, then a slow link."""
    assert rig.broker_proxy is not None
    r = FaultResult("device<->broker cut/corrupt/delay")
    rig.start_devices()
    rig.steady()
    p = rig.broker_proxy
    connects = {d.id: d.stats.connects for d in rig.devices}
    p.cut()
    time.sleep(down_s)
    p.restore()
    _reconnected(rig, connects)
    p.corrupt(3 * len(rig.devices))
    deadline = time.monotonic() + 30
    while p.corrupted < 3 * len(rig.devices) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.restore()
    p.delay(0.05)
    time.sleep(down_s)
    p.restore()
    since = time.monotonic()
    r.notes["corrupted_chunks"] = p.corrupted
    rig.recover(r, since)
    return rig.finish(r)


def database_link(rig: FaultRig, down_s: float = 2.0) -> FaultResult:
    """Between the workers and the database: every connection reset and refused, then a
    slow link, then back."""
    assert rig.db_proxy is not None
    r = FaultResult("worker<->database cut/delay")
    rig.start_devices()
    rig.steady()
    p = rig.db_proxy
    p.cut()
    time.sleep(down_s)
    p.restore()
    p.delay(0.02)
    time.sleep(down_s)
    p.restore()
    since = time.monotonic()
    rig.recover(r, since)
    return rig.finish(r)


def clocks_skewed(rig: FaultRig) -> FaultResult:
    """Devices whose clocks are hours off (``FaultRig(skew_s=...)``): every batch is
    stored, with the device's own time."""
    r = FaultResult("device clocks skewed %+.0f h" % (rig.skew_s / 3600))
    rig.start_devices()
    since = time.monotonic()
    rig.steady()
    rig.recover(r, since)
    r = rig.finish(r)
    lo, hi = rig.sql("SELECT min(t), max(t) FROM reading")[0]
    r.notes["t_offset_s"] = (lo - time.time(), hi - time.time())
    return r


def _reconnected(rig: FaultRig, before: dict[str, int], timeout: float = SETTLE_S) -> int:
    """Wait until every device connected again since ``before``; how many did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(d.stats.connects == before[d.id]
                                              for d in rig.devices):
        time.sleep(0.05)
    return sum(d.stats.connects > before[d.id] for d in rig.devices)


def thundering_herd(rig: FaultRig, down_s: float = 2.0) -> FaultResult:
    """Every device loses its connection at once (the link in front of the broker resets
    and refuses them, as a broker outage does for the devices) and they all come back at
    the same moment: a herd of reconnects, TLS handshakes and resent batches."""
    assert rig.broker_proxy is not None
    r = FaultResult("herd of %d reconnecting at once" % len(rig.devices))
    rig.start_devices()
    rig.steady()
    connects = {d.id: d.stats.connects for d in rig.devices}
    rig.broker_proxy.cut()
    time.sleep(down_s)
    rig.broker_proxy.restore()
    since = time.monotonic()
    r.notes["reconnected"] = _reconnected(rig, connects)
    r.notes["all_reconnected_s"] = round(time.monotonic() - since, 2)
    rig.recover(r, since)
    return rig.finish(r)


def broker_restarted(rig: FaultRig, down_s: float = 2.0, crash: bool = False,
                     away_batches: int = 3, settle_s: float = SETTLE_S) -> FaultResult:
    """Mosquitto stops under load (SIGTERM: it saves its state; ``crash``: SIGKILL, its
    state is what it saved last, ``autosave_interval``) and starts again. The ingest
    workers are frozen (SIGSTOP) from just before the stop until every device has been
    acknowledged ``away_batches`` more batches by the new broker: the worst order, devices
    back before the ingest has subscribed again. Those batches, and what the broker had
    queued for the ingest, must be stored once the workers are back."""
    r = FaultResult("broker %s, %d %s worker%s" % (
        "kill -9" if crash else "restart", len(rig.workers), rig.subscription,
        "s" if len(rig.workers) > 1 else ""))
    if rig.subscription == "shared":
        r.notes["known_gap"] = "Mosquitto saves no shared subscription"
    elif crash:
        r.notes["known_gap"] = "a crash loses what changed since the last autosave"
    rig.start_devices()
    rig.steady()
    connects = {d.id: d.stats.connects for d in rig.devices}
    for w in rig.workers:
        w.pause()
    try:
        (rig.broker.kill if crash else rig.broker.stop)()
        time.sleep(down_s)
        rig.broker.start()
        since = time.monotonic()
        r.notes["reconnected"] = _reconnected(rig, connects)
        back = {d.id: d.stats.published for d in rig.devices}
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline and any(
                d.stats.published < back[d.id] + away_batches for d in rig.devices):
            time.sleep(0.05)
        r.notes["acked_while_ingest_away"] = sum(d.stats.published - back[d.id]
                                                 for d in rig.devices)
    finally:
        for w in rig.workers:
            w.resume()
    rig.wait_stored(rig.signed(), min(60.0, settle_s))  # what was lost stays lost
    r.recovery_s = time.monotonic() - since
    # a batch still missing below a stored one of its device has had that whole wait: it
    # is counted as lost without a second wait for it (which was settle_s more)
    return rig.finish(r, settle_s, given_up=rig.holes())


def broker_restarted_after_save(rig: FaultRig) -> FaultResult:
    """A crash (kill -9) of Mosquitto, once it has saved the ingest's session (after
    ``autosave_interval``): what it had acknowledged since its last save and not yet
    delivered is gone; the rest must be stored."""
    t0 = time.monotonic()
    db = rig.broker.dir / "mosquitto.db"
    deadline = t0 + SETTLE_S
    while not db.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert db.exists(), "the broker never saved its state"
    return broker_restarted(rig, crash=True)


def flood(rig: FaultRig, interval_s: float = 0.005) -> FaultResult:
    """One device signs a batch every ``interval_s`` (as fast as its PUBACKs come back)
    while the others stream at their rate: the shared subscription carries the flood to
    the workers, and every device's batches are still stored, once."""
    r = FaultResult("one device flooding the stream")
    rig.devices[0].interval_s = interval_s
    rig.start_devices()
    rig.steady()
    time.sleep(2.0)
    since = time.monotonic()
    rig.recover(r, since)
    r = rig.finish(r)
    flooder = rig.devices[0]
    r.notes["flooder_batches"] = flooder.stats.published
    r.notes["others_batches"] = [d.stats.published for d in rig.devices[1:]]
    return r


DISK_FULL_TABLES = ("reading", "ingest_event", "chain_state", "ingest_dead_letter", "device")


def database_disk_full(rig: FaultRig, full_s: float = 2.0) -> FaultResult:
    """The database's disk is full: every write the ingest makes fails with SQLSTATE
    53100 (``disk_full``, raised by triggers: a size-limited filesystem needs root), then
    space is freed."""
    r = FaultResult("database disk full (SQLSTATE 53100)")
    rig.start_devices()
    rig.steady()
    with psycopg.connect(rig.db_url, autocommit=True) as c:
        c.execute("CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  "RAISE EXCEPTION 'could not extend file: No space left on device' "
                  "USING ERRCODE = 'disk_full'; END $$")
        for t in DISK_FULL_TABLES:
            c.execute("CREATE TRIGGER full_%s BEFORE INSERT OR UPDATE ON %s FOR EACH ROW "
                      "EXECUTE FUNCTION disk_full()" % (t, t))
        time.sleep(full_s)
        for t in DISK_FULL_TABLES:
            c.execute("DROP TRIGGER full_%s ON %s" % (t, t))
    since = time.monotonic()
    rig.recover(r, since)
    r = rig.finish(r)
    r.notes["dead_letters"] = rig.sql("SELECT count(*) FROM ingest_dead_letter")[0][0]
    return r


@contextlib.contextmanager
def own_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of the caller's own (for a fault that stops it)."""
    from support import pg

    with pg.pg_cluster() as cluster:
        yield cluster


def run_all(pki_dir: Path | None = None, *, devices: int, herd: int,
            say: Callable[[str], None] = print, only: str = "") -> list[FaultResult]:
    """Every fault at the given size (``only``: those whose function's name contains
    it), each on a fresh rig; prints the table."""
    base = Path(tempfile.mkdtemp(prefix="cityedge-chaos-"))
    base.chmod(0o755)
    pki = TestPKI(pki_dir or base / "pki")
    results = []
    say(HEADER)
    try:
        with own_cluster() as cluster:
            plan: list[tuple[Callable[[FaultRig], FaultResult], dict[str, Any]]] = [
                (worker_killed, {}), (database_restarted, {}),
                (device_link, {"broker_proxy": True}), (database_link, {"db_proxy": True}),
                (clocks_skewed, {"skew_s": 5 * 3600.0}),
                (clocks_skewed, {"skew_s": -5 * 3600.0}),
                (database_disk_full, {}),
                (thundering_herd, {"devices": herd, "broker_proxy": True}),
                (flood, {}),
                (broker_restarted, {"workers": 1}),  # production: plain subscriptions
                (broker_restarted, {"workers": 2}),  # shared: Mosquitto loses the window
                (broker_restarted_after_save, {"workers": 1}),
            ]
            for fault, opts in plan:
                if only not in fault.__name__:
                    continue
                opts = {"devices": devices, **opts}
                with FaultRig(pki, cluster, **opts) as rig:
                    result = fault(rig)
                results.append(result)
                say(result.row())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results

