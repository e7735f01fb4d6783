"""The faults of ``tests/fleet/test_fleet_faults.py`` on the clustered broker, at a small
size with exact counts (``support.faults_cluster``; ``make chaos CHAOS_ENGINE=rabbitmq``
runs the large versions): fast devices spread over three RabbitMQ nodes, two ``cityedge
fleet ingest`` processes consuming the quorum queue over AMQP, PostgreSQL. For every
fault: no batch a device saw acknowledged is lost, none is stored twice, the redelivered
copies are counted as duplicate events, and the fleet recovers by itself (the recovery
time is measured and printed, not asserted).

One cluster and one PostgreSQL for the module (a node boots in tens of seconds); each
fault gets a rig of its own on them (its database, devices and workers). The node killed
and restarted under load, with a revoked device, is ``test_rabbitmq_cluster.py``'s; here
it runs with the rig's counts.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from support import faults
from support.faults_cluster import (
    ClusterFaultRig,
    identities,
    node_disk_full,
    node_killed,
    node_paused,
)
from support.mosquitto import TestPKI
from support.rabbitmq import RabbitCluster

DEVICES = 6  # two per node
HERD = 12


@pytest.fixture(scope="module")
def world() -> Iterator[SimpleNamespace]:
    base = Path(tempfile.mkdtemp(prefix="cityedge-rmq-faults-"))
    base.chmod(0o755)
    pki = TestPKI(base / "pki")
    cluster = RabbitCluster(pki, identities(HERD), directory=base / "rmq")
    try:
        with ThreadPoolExecutor(1) as pool, faults.own_cluster() as pg:
            pool.submit(cluster.start).result()  # boots while PostgreSQL starts
            yield SimpleNamespace(pki=pki, pg=pg, cluster=cluster)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def rig(w: SimpleNamespace, **opts: object) -> ClusterFaultRig:
    return ClusterFaultRig(w.pki, w.pg, w.cluster, **{"devices": DEVICES, **opts})


def test_an_ingest_worker_killed_mid_transaction_loses_and_doubles_nothing(
        world: SimpleNamespace) -> None:
    with rig(world) as fr:
        r = faults.worker_killed(fr)
    assert r.notes["killed_in_transaction"]
    assert r.notes["worker_starts"] == [2, 1]
    faults.check_nothing_lost(r)


def test_postgresql_crashing_under_load_loses_nothing(world: SimpleNamespace) -> None:
    with rig(world) as fr:
        faults.check_nothing_lost(faults.database_restarted(fr))


def test_a_cut_garbled_and_slow_device_link_loses_nothing(world: SimpleNamespace) -> None:
    with rig(world, broker_proxy=True) as fr:
        r = faults.device_link(fr)
    assert r.notes["corrupted_chunks"] > 0
    faults.check_nothing_lost(r)


def test_device_clocks_hours_off_store_everything_with_their_time(
        world: SimpleNamespace) -> None:
    with rig(world, skew_s=-5 * 3600.0) as fr:
        r = faults.clocks_skewed(fr)
    faults.check_nothing_lost(r)
    lo, hi = r.notes["t_offset_s"]
    assert abs(lo + 5 * 3600) < 600 and abs(hi + 5 * 3600) < 600


def test_a_herd_reconnecting_at_once_loses_nothing(world: SimpleNamespace) -> None:
    with rig(world, devices=HERD, broker_proxy=True) as fr:
        r = faults.thundering_herd(fr)
    assert r.notes["reconnected"] == HERD
    faults.check_nothing_lost(r)


def test_a_device_flooding_the_queue_holds_back_nobody(world: SimpleNamespace) -> None:
    with rig(world) as fr:
        r = faults.flood(fr)
    others = r.notes["others_batches"]
    assert r.notes["flooder_batches"] > 2 * max(others)  # it did flood
    assert min(others) > 0
    faults.check_nothing_lost(r)


def test_a_node_killed_and_restarted_under_load_loses_nothing(
        world: SimpleNamespace) -> None:
    """Node 1: the one the workers consume from, likely the queue's leader, with two of
    the devices."""
    with rig(world) as fr:
        r = node_killed(fr)
    assert r.notes["devices_refused"] == r.notes["reconnected"] == DEVICES // 3
    faults.check_nothing_lost(r)


def test_a_node_with_a_full_disk_holds_every_publisher_and_loses_nothing(
        world: SimpleNamespace) -> None:
    """Node 2's disk alarm: the devices go on signing, the cluster acknowledges (next to)
    nothing until the alarm clears (a PUBACK already on its way may still arrive), then
    every batch is stored once."""
    with rig(world) as fr:
        r = node_disk_full(fr)
    assert all(r.notes["alarm_on_other_nodes"])  # one node's alarm holds the cluster
    assert r.notes["signed_while_full"] > r.notes["acked_while_full"]
    faults.check_nothing_lost(r)


def test_a_frozen_node_holds_only_its_own_devices_and_loses_nothing(
        world: SimpleNamespace) -> None:
    """Node 1 frozen 6 s or more (the workers' node, likely the queue's leader): the
    other two, a majority, go on acknowledging their devices; the frozen node's devices
    wait."""
    with rig(world) as fr:
        r = node_paused(fr)
    # more than one each: a batch sent after the freeze, confirmed by the two nodes left
    assert r.notes["acked_on_other_nodes"] > r.notes["other_devices"]
    faults.check_nothing_lost(r)
