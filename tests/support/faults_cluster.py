"""The fault rig of ``support.faults`` on the clustered broker (docs/BROKERS.md): fast
devices spread over the nodes of a three-node RabbitMQ cluster (``support.rabbitmq``,
configured as ``cityedge broker config --engine rabbitmq`` writes it) -> the quorum queue
-> several ``cityedge fleet ingest`` processes run with ``broker_engine = "rabbitmq"``
(``ingest_amqp``: AMQP competing consumers, each message acknowledged after its commit)
-> PostgreSQL.

The fault functions of ``support.faults`` run unchanged on a ``ClusterFaultRig``; the
cluster adds ``node_killed`` (a node ``kill -9``ed under load and started again),
``node_disk_full`` (a node's disk alarm), ``node_paused`` (a node frozen) and
``worker_link`` (the workers' AMQP links to the nodes broken: ``amqp_proxy``) and, on
a cluster whose nodes have hosts of their own (``RabbitCluster(hosts=...)``),
``node_partitioned`` (a node cut off from the other nodes, not from its clients). A
cluster boots in tens of seconds, so one serves every rig (the caller's, as its
PostgreSQL): each rig has its own database, devices and workers, and finds the ingest
queue empty (``queue_depth``; what was left is purged and counted in
``notes["queue_left_before"]``). Device ``i`` (0-based) is on node ``i % nodes``;
``broker_proxy`` puts a ``LinkProxy`` in front of each node (``NodeLinks``), broken
together: a device's uplink, whichever node it uses.

``python -m support.chaos --engine rabbitmq`` (``make chaos CHAOS_ENGINE=rabbitmq``) runs them
at a large size (``run_all``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pika

from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet import ingest_amqp
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import FleetLimits, Settings

from support import faults
from support.faults import FaultResult, FaultRig
from support.fleet import device_body, wait_for
from support.fleet_ca import fleet_ca_from_pki
from support.linkproxy import LinkProxy
from support.mosquitto import TestPKI
from support.netns import Hosts
from support.pg import PgCluster
from support.rabbitmq import RabbitCluster

WORKERS_MAX = 4  # ingest identities the cluster knows: fleet-ingest, fleet-ingest-2..
DRAIN_S = 60.0  # the longest wait for the ingest queue to be empty after a fault
FROZEN_MAX_S = 60.0  # the longest a node stays frozen waiting for the majority to go on
PARTITION_MAX_S = 90.0  # the longest a partition lasts waiting for both sides to act
# Erlang's net_ticktime on a cluster made for partitions: a silent peer is gone after
# about this long (the default, 60 s, would make each partition minutes long)
PARTITION_TICKTIME_S = 10


def identities(devices: int) -> list[str]:
    """The users a cluster for rigs of up to ``devices`` devices boots with (the rigs
    enroll ``device_body(1..devices)``; the fleet's grants are no-ops without
    ``broker_rabbitmq_nodes``, as the registry's view is already there)."""
    return [*(str(device_body(i)["id"]) for i in range(1, devices + 1)), "fleet-ingest",
            *("fleet-ingest-%d" % k for k in range(2, WORKERS_MAX + 1))]


class ClusterBroker:
    """What a ``FaultRig`` asks of its broker, on a cluster it does not own."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster

    @property
    def port(self) -> int:  # MQTT of the first node (the enrollment's throwaway device)
        return self.cluster.nodes[0].mqtt_port

    def grant(self, *_cns: str) -> None:
        """Every identity is in the definitions the cluster booted with."""

    def cleanup(self) -> None:
        """The cluster is the caller's."""


class NodeLinks:
    """A ``LinkProxy`` in front of each node, with one proxy's interface: every link is
    cut, garbled, delayed and restored together."""

    def __init__(self, ports: list[int], hosts: list[str] | None = None) -> None:
        self.proxies = [LinkProxy(p, h).start()
                        for p, h in zip(ports, hosts or ["127.0.0.1"] * len(ports),
                                        strict=True)]

    @property
    def port(self) -> int:
        return self.proxies[0].port

    def port_for(self, i: int) -> int:
        return self.proxies[i % len(self.proxies)].port

    @property
    def corrupted(self) -> int:
        return sum(p.corrupted for p in self.proxies)

    def cut(self, refuse: bool = True) -> None:
        for p in self.proxies:
            p.cut(refuse)

    def blackhole(self) -> None:
        for p in self.proxies:
            p.blackhole()

    def delay(self, seconds: float) -> None:
        for p in self.proxies:
            p.delay(seconds)

    def corrupt(self, chunks: int) -> None:
        for p in self.proxies:
            p.corrupt(chunks)

    def restore(self) -> None:
        for p in self.proxies:
            p.restore()

    def close(self) -> None:
        for p in self.proxies:
            p.close()


class ClusterFaultRig(FaultRig):
    """A ``FaultRig`` whose broker is ``cluster`` and whose workers consume its quorum
    queue over AMQP, as production's ``cityedge fleet ingest`` does on a cluster."""

    def __init__(self, pki: TestPKI, pg: PgCluster, cluster: RabbitCluster, *,
                 amqp_proxy: bool = False, **opts: Any) -> None:
        """``amqp_proxy``: the workers reach the nodes' AMQP listeners through a
        ``NodeLinks`` of their own (``amqp_links``)."""
        self.cluster = cluster
        self.amqp_links = (NodeLinks([n.amqp_port for n in cluster.nodes], self._hosts())
                           if amqp_proxy else None)
        super().__init__(pki, pg, **opts)

    def _world(self, persistence: bool) -> tuple[Path, Any, Settings]:
        world = Path(tempfile.mkdtemp(prefix="cityedge-cfault-"))
        world.chmod(0o755)
        ca_dir = fleet_ca_from_pki(self.pki, world / "ca")
        CertificateAuthority(ca_dir).write_crl([], 86400)
        ingest = self.pki.service("fleet-ingest")
        settings = Settings(
            mode="development", database_url=self.db_url, ca_dir=ca_dir,
            broker_engine="rabbitmq", ingest_amqp_nodes=self.amqp_nodes(),
            mqtt_ca_file=self.pki.ca_pem, mqtt_cert_file=ingest.cert_pem,
            mqtt_key_file=ingest.key_pem, ingest_with_serve=False,
            commands_with_serve=False, audit_key_file=world / "audit.key",
            command_key_file=world / "command.key",
            limits=FleetLimits(ingest_group_max_s=0.05, enroll_burst=100_000))
        return world, ClusterBroker(self.cluster), settings

    def _hosts(self) -> list[str]:
        return [self.cluster.host(i) for i in range(len(self.cluster.nodes))]

    def amqp_nodes(self) -> str:
        if self.amqp_links is not None:
            return ",".join("127.0.0.1:%d" % p.port for p in self.amqp_links.proxies)
        return ",".join("%s:%d" % (h, n.amqp_port)
                        for h, n in zip(self._hosts(), self.cluster.nodes, strict=True))

    def close(self) -> None:
        super().close()
        if self.amqp_links is not None:
            self.amqp_links.close()

    def ingest_env(self) -> dict[str, str]:
        return {"CITYEDGE_BROKER_ENGINE": "rabbitmq",
                "CITYEDGE_INGEST_AMQP_NODES": self.amqp_nodes()}

    def _broker_proxy(self) -> Any:
        return NodeLinks([n.mqtt_port for n in self.cluster.nodes], self._hosts())

    def device_host(self, i: int) -> str:
        if self.broker_proxy is not None:
            return "127.0.0.1"
        return self.cluster.host(i % len(self.cluster.nodes))

    def device_port(self, i: int) -> int:
        if self.broker_proxy is not None:
            return int(self.broker_proxy.port_for(i))
        return self.cluster.nodes[i % len(self.cluster.nodes)].mqtt_port

    def _start_workers(self, cns: list[str]) -> list[faults.IngestProc]:
        """All at once (each takes seconds to import and connect)."""
        with ThreadPoolExecutor(len(cns)) as pool:
            return list(pool.map(lambda cn: faults.IngestProc(self, cn).start(), cns))

    def _build(self) -> None:
        self.queue_left_before = purge(self.cluster, self.pki)
        super()._build()

    def finish(self, result: FaultResult, settle_s: float = faults.SETTLE_S) -> FaultResult:
        """As ``FaultRig.finish``, then until the queue is empty and the ingest quiet
        (redeliveries of stored batches still on their way are counted too)."""
        r = super().finish(result, settle_s)
        r.notes["queue_left_before"] = self.queue_left_before
        deadline = time.monotonic() + DRAIN_S
        last = -1
        while time.monotonic() < deadline:
            events = self.sql("SELECT count(*) FROM ingest_event")[0][0]
            if queue_depth(self.cluster, self.pki) == 0 and events == last:
                break
            last = events
            time.sleep(0.5)
        else:
            raise AssertionError("%s: the ingest queue never emptied" % r.fault)
        have = self.stored()
        r.stored = sum(len(v) for v in have.values())
        r.duplicates_stored = sum(1 for v in have.values() for n in v.values()
                                  if n != faults.READINGS)
        r.duplicate_events = self.sql(
            "SELECT count(*) FROM ingest_event WHERE status = 'duplicate'")[0][0]
        return r


# -- the queue, seen as the ingest sees it ------------------------------------------------


@contextlib.contextmanager
def _channel(cluster: RabbitCluster, pki: TestPKI) -> Iterator[Any]:
    creds = pki.service("fleet-ingest")
    tls = ssl.create_default_context(cafile=str(pki.ca_pem))
    tls.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
    params = [pika.ConnectionParameters(
        host=cluster.host(i), port=n.amqp_port, virtual_host=rmq.VHOST,
        credentials=pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(tls, server_hostname=cluster.host(i)),
        socket_timeout=5, connection_attempts=1) for i, n in enumerate(cluster.nodes)]
    connection = pika.BlockingConnection(params)
    try:
        yield connection.channel()
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def queue_depth(cluster: RabbitCluster, pki: TestPKI) -> int:
    """Messages ready in the ingest queue (not those a worker holds unacknowledged)."""
    with _channel(cluster, pki) as ch:
        return int(ch.queue_declare(rmq.INGEST_QUEUE, passive=True).method.message_count)


def purge(cluster: RabbitCluster, pki: TestPKI) -> int:
    """Empty the ingest queue (a previous rig's leftovers); how many messages it held."""
    with _channel(cluster, pki) as ch:
        return int(ch.queue_purge(rmq.INGEST_QUEUE).method.message_count)


# -- the cluster's own fault --------------------------------------------------------------


def node_killed(rig: ClusterFaultRig, node: int = 0) -> FaultResult:
    """A node ``kill -9``ed under load and started again by its service manager: the node
    the ingest workers consume from (the first of their ``ingest_amqp_nodes``; they move
    to the next) and, booted first, likely the quorum queue's leader; its devices keep
    their batches until it is back and reconnect to it (RabbitMQ 3.10 keeps a device's
    MQTT subscription on its node: docs/BROKERS.md). Recovery is from the kill."""
    c = rig.cluster
    r = FaultResult("node %d of %d kill -9 + restart" % (node + 1, len(c.nodes)))
    rig.start_devices()
    rig.steady()
    on_node = [d for i, d in enumerate(rig.devices) if i % len(c.nodes) == node]
    failures = {d.id: d.stats.connect_failures for d in on_node}
    connects = {d.id: d.stats.connects for d in on_node}
    c.kill(node)
    since = time.monotonic()
    deadline = since + faults.SETTLE_S
    while time.monotonic() < deadline and any(d.stats.connect_failures == failures[d.id]
                                              for d in on_node):
        time.sleep(0.05)
    r.notes["devices_refused"] = sum(d.stats.connect_failures > failures[d.id]
                                     for d in on_node)
    c.start_node(node)
    c.wait_listening(node)
    r.notes["node_back_s"] = round(time.monotonic() - since, 2)
    while time.monotonic() < deadline and any(d.stats.connects == connects[d.id]
                                              for d in on_node):
        time.sleep(0.05)
    r.notes["reconnected"] = sum(d.stats.connects > connects[d.id] for d in on_node)
    rig.recover(r, since)
    return rig.finish(r)


def worker_link(rig: ClusterFaultRig, down_s: float = 2.0,
                silent_s: float = 2.5 * ingest_amqp.HEARTBEAT_S) -> FaultResult:
    """Between the ingest workers and the nodes (``amqp_proxy``): every AMQP connection
    reset and refused; then silent (bytes vanish, connections stay open) for
    ``silent_s``, long enough for both ends' heartbeats to give up; then a slow link;
    then back."""
    assert rig.amqp_links is not None
    r = FaultResult("workers<->nodes cut/silent/delay")
    rig.start_devices()
    rig.steady()
    links = rig.amqp_links
    links.cut()
    time.sleep(down_s)
    links.restore()
    time.sleep(down_s)
    links.blackhole()
    time.sleep(silent_s)
    links.restore()
    links.delay(0.02)
    time.sleep(down_s)
    links.restore()
    since = time.monotonic()
    rig.recover(r, since)
    return rig.finish(r)


def disk_alarm(cluster: RabbitCluster, node: int) -> bool:
    """Whether ``node`` reports its disk alarm (``rabbit_alarm:get_alarms()``)."""
    return "disk" in cluster.ctl("eval", "rabbit_alarm:get_alarms().", node=node)


def _wait_alarm(cluster: RabbitCluster, node: int, on: bool) -> None:
    assert wait_for(lambda: disk_alarm(cluster, node) == on, faults.SETTLE_S), \
        "node %d: the disk alarm did not %s" % (node + 1, "go on" if on else "clear")


def node_disk_full(rig: ClusterFaultRig, node: int = 1, full_s: float = 3.0) -> FaultResult:
    """A node's disk is full: its free-space limit raised past what the disk has
    (``rabbitmqctl set_disk_free_limit``), which is how RabbitMQ meets a full disk: the
    disk alarm, which blocks every publishing connection of the cluster (not only the
    node's) until space is back, then the limit it had restored. Nothing a node could
    not write is acknowledged to a device: the devices keep their batches, send them
    when the alarm clears, and every one is stored once. Recovery is from the alarm's
    end."""
    c = rig.cluster
    r = FaultResult("node %d disk full (disk alarm) %.0f s" % (node + 1, full_s))
    rig.start_devices()
    rig.steady()
    limit = c.ctl("eval", "rabbit_disk_monitor:get_disk_free_limit().", node=node).strip()
    assert limit.isdigit(), limit
    c.ctl("set_disk_free_limit", "%dGB" % 10 ** 9, node=node)
    try:
        _wait_alarm(c, node, True)
        acked_before = acked(rig.devices)
        signed = sum(rig.signed().values())
        time.sleep(full_s)
        r.notes["alarm_on_other_nodes"] = [disk_alarm(c, i) for i in range(len(c.nodes))
                                           if i != node]
        r.notes["acked_while_full"] = acked(rig.devices) - acked_before
        r.notes["signed_while_full"] = sum(rig.signed().values()) - signed
    finally:
        c.ctl("set_disk_free_limit", limit, node=node)
    _wait_alarm(c, node, False)
    since = time.monotonic()
    rig.recover(r, since)
    return rig.finish(r)


def leader_number(cluster: RabbitCluster) -> int:
    """The ingest queue's leader now: its node's number (1-based, as the faults name
    nodes)."""
    leader = cluster.queue_leader(rmq.INGEST_QUEUE)
    return [n.name for n in cluster.nodes].index(leader) + 1


def acked(devices: list[Any]) -> int:
    """Batches these devices have seen acknowledged (PUBACK) so far."""
    return sum(d.stats.published for d in devices)


def _steady_sides(rig: ClusterFaultRig, node: int, r: FaultResult
                  ) -> tuple[list[Any], list[Any]]:
    """The devices started and steady, the queue's leader noted; the devices on ``node``
    and the others."""
    rig.start_devices()
    rig.steady()
    r.notes["leader_before"] = leader_number(rig.cluster)
    on_node = [d for i, d in enumerate(rig.devices) if i % len(rig.cluster.nodes) == node]
    return on_node, [d for d in rig.devices if d not in on_node]


def node_paused(rig: ClusterFaultRig, node: int = 0, pause_s: float = 6.0) -> FaultResult:
    """A node frozen for ``pause_s`` (SIGSTOP to its processes, then SIGCONT), longer if
    the others have not acknowledged a batch sent after the freeze by then
    (``notes["frozen_s"]``): a VM stall,
    or the node cut off from the others and from its clients at once (Jepsen's "pause").
    Node 1: the one the workers consume from and, booted first, likely the quorum queue's
    leader. The other two are a majority: they elect a leader among themselves and go on
    confirming their devices' batches; the frozen node's devices get no PUBACK until it is
    back; nothing is stored while the workers' node is frozen (they wait for it through
    a pause shorter than their AMQP heartbeats, and move to the next node after a longer
    one). Recovery is from the SIGCONT."""
    c = rig.cluster
    r = FaultResult("node %d of %d frozen (SIGSTOP)" % (node + 1, len(c.nodes)))
    on_node, others = _steady_sides(rig, node, r)
    acked_on, acked_others = acked(on_node), acked(others)
    c.pause(node)
    frozen = time.monotonic()
    try:
        # frozen at least pause_s, and until the majority acknowledged a batch sent after
        # the freeze (its new leader elected: seconds, not a fixed time), or FROZEN_MAX_S
        # at most. A device waits for one PUBACK at a time, so more than one per device
        # means at least one publish made after the freeze was confirmed.
        wait_for(lambda: time.monotonic() - frozen >= pause_s
                 and acked(others) - acked_others > len(others), FROZEN_MAX_S)
        r.notes["other_devices"] = len(others)
        r.notes["frozen_s"] = round(time.monotonic() - frozen, 1)
        r.notes["acked_on_frozen_node"] = acked(on_node) - acked_on
        r.notes["acked_on_other_nodes"] = acked(others) - acked_others
    finally:
        c.resume(node)
    since = time.monotonic()
    rig.recover(r, since)
    r.notes["leader_after"] = leader_number(c)
    return rig.finish(r)


def listening(cluster: RabbitCluster, node: int) -> bool:
    """Whether ``node`` takes MQTT connections (a node paused by ``pause_minority`` has
    stopped its listeners)."""
    try:
        with socket.create_connection((cluster.host(node), cluster.nodes[node].mqtt_port), 1):
            return True
    except OSError:
        return False


def cluster_view(cluster: RabbitCluster, node: int) -> tuple[int, list[str]]:
    """What ``node`` sees: how many nodes run, and the partitions it has recorded."""
    out = cluster.ctl("eval", "{length(rabbit_nodes:all_running()), "
                      "rabbit_node_monitor:partitions()}.", node=node).strip()
    running, _, partitions = out.strip("{}").partition(",")
    return int(running), [p.strip("' ") for p in partitions.strip("[]").split(",") if p]


def node_partitioned(rig: ClusterFaultRig, node: int = 0) -> FaultResult:
    """Node ``node`` cut off from the other nodes (``Hosts.partition``: no packet crosses,
    the open connections go silent) while it and they still reach their devices and the
    workers, until it has noticed and paused itself (``cluster_partition_handling =
    pause_minority``: it stops its listeners and drops its clients; it notices after
    Erlang's ``net_ticktime``), the majority has acknowledged more batches than it has
    devices (a leader of the quorum queue among themselves) and sees it gone. Then
    healed. Node 1: the
    workers' node and, booted first, the quorum queue's leader. The minority must
    acknowledge nothing sent after the cut (a device waits for one PUBACK at a time, so
    at most one per device, sent before it); after the heal the node rejoins by itself,
    its devices reconnect, and the cluster records no partition. Recovery is from the
    heal."""
    c = rig.cluster
    assert c.hosts is not None, "a partition needs the nodes on hosts of their own"
    others_i = [i for i in range(len(c.nodes)) if i != node]
    r = FaultResult("node %d of %d partitioned from the others" % (node + 1, len(c.nodes)))
    on_node, others = _steady_sides(rig, node, r)
    acked_on, acked_others = acked(on_node), acked(others)
    connects = {d.id: d.stats.connects for d in on_node}
    c.hosts.partition([node], others_i)
    cut = time.monotonic()
    paused_s = None
    try:
        def settled() -> bool:
            nonlocal paused_s
            if paused_s is None and not listening(c, node):
                paused_s = time.monotonic() - cut
            if paused_s is None or acked(others) - acked_others <= len(others):
                return False
            # and the majority has called it gone (its own tick: node 1's may come first,
            # and the quorum queue's leader moves sooner still); one CLI call a look
            r.notes["majority_view"] = cluster_view(c, others_i[0])
            return bool(r.notes["majority_view"][0] == len(others_i))
        wait_for(settled, PARTITION_MAX_S)
        r.notes["partitioned_s"] = round(time.monotonic() - cut, 1)
        r.notes["minority_paused_s"] = None if paused_s is None else round(paused_s, 1)
        r.notes["acked_on_minority"] = acked(on_node) - acked_on
        r.notes["acked_on_majority"] = acked(others) - acked_others
        r.notes["devices_on_minority"] = len(on_node)
        r.notes["devices_on_majority"] = len(others)
    finally:
        c.hosts.heal()
    since = time.monotonic()
    c.wait_listening(node, PARTITION_MAX_S)
    r.notes["node_back_s"] = round(time.monotonic() - since, 1)
    wait_for(lambda: all(d.stats.connects > connects[d.id] for d in on_node), faults.SETTLE_S)
    r.notes["reconnected"] = sum(d.stats.connects > connects[d.id] for d in on_node)
    rig.recover(r, since)
    r.notes["views_after"] = [cluster_view(c, i) for i in range(len(c.nodes))]
    r.notes["leader_after"] = leader_number(c)
    return rig.finish(r)


# -- make chaos ----------------------------------------------------------------------------


def run_all(pki_dir: Path | None = None, *, devices: int, herd: int,
            say: Callable[[str], None] = print, only: str = "") -> list[FaultResult]:
    """``faults.run_all`` on one cluster: every fault at the given size, each on a fresh
    rig; prints the table."""
    base = Path(tempfile.mkdtemp(prefix="cityedge-chaos-rmq-"))
    base.chmod(0o755)
    pki = TestPKI(pki_dir or base / "pki")
    results = []
    say(faults.HEADER)
    plan: list[tuple[Callable[[Any], FaultResult], dict[str, Any]]] = [
        (faults.worker_killed, {}), (faults.database_restarted, {}),
        (faults.device_link, {"broker_proxy": True}),
        (faults.database_link, {"db_proxy": True}),
        (worker_link, {"amqp_proxy": True}),
        (faults.clocks_skewed, {"skew_s": 5 * 3600.0}),
        (faults.clocks_skewed, {"skew_s": -5 * 3600.0}),
        (faults.database_disk_full, {}),
        (faults.thundering_herd, {"devices": herd, "broker_proxy": True}),
        (faults.flood, {}),
        (node_killed, {}),
        (node_disk_full, {}),
        (node_paused, {}),
    ]
    plan = [(fault, opts) for fault, opts in plan if only in fault.__name__]
    cluster = RabbitCluster(pki, identities(max(devices, herd)), directory=base / "rmq")
    try:
        with ThreadPoolExecutor(1) as pool, faults.own_cluster() as pg:
            if plan:  # the loopback cluster boots while PostgreSQL starts
                pool.submit(cluster.start).result()
            for fault, opts in plan:
                opts = {"devices": devices, **opts}
                with ClusterFaultRig(pki, pg, cluster, **opts) as rig:
                    result = fault(rig)
                results.append(result)
                say(result.row())
            cluster.stop()
            if only in node_partitioned.__name__:  # last: a cluster of its own, on hosts
                results.append(_partitioned_run(pki, pg, base, devices))
                say(results[-1].row())
    finally:
        cluster.stop()  # every node and its epmd
        shutil.rmtree(base, ignore_errors=True)
    return results


def partition_cluster(pki: TestPKI, directory: Path, devices: int
                      ) -> tuple[Hosts, RabbitCluster]:
    """Three nodes on hosts of their own (``support.netns``), booted, for
    ``node_partitioned``; the caller stops the cluster, then closes the hosts."""
    hosts = Hosts(3)
    try:
        cluster = RabbitCluster(pki, identities(devices), directory=directory, hosts=hosts,
                                net_ticktime=PARTITION_TICKTIME_S)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
    except BaseException:
        hosts.close()
        raise
    return hosts, cluster


def _partitioned_run(pki: TestPKI, pg: PgCluster, base: Path, devices: int) -> FaultResult:
    hosts, cluster = partition_cluster(pki, base / "rmq-hosts", devices)
    try:
        with ClusterFaultRig(pki, pg, cluster, devices=devices) as rig:
            return node_partitioned(rig)
    finally:
        cluster.stop()
        hosts.close()
