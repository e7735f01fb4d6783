"""A network partition inside the clustered broker, on the layout of a city's deployment:
three RabbitMQ nodes, each on a host of its own (``support.netns``: a network namespace,
its own address, ``cityedge broker config --node-host a,b,c``'s long node names and the
same ports on every host), fast devices spread over them, two ``cityedge fleet ingest``
processes on the quorum queue, PostgreSQL.

The partition cuts node 1 (the workers' node, the queue's leader) off from nodes 2 and 3
and leaves every node reachable from its devices and the workers: the failure that
loopback proxies cannot make (the Erlang distribution between nodes). The cluster's
``pause_minority`` must pause node 1, the majority must elect a leader and go on, the
minority must acknowledge nothing, and after the heal node 1 must rejoin by itself with
no partition left recorded, its devices back and every acknowledged batch stored once.

``net_ticktime`` is 10 s here (``PARTITION_TICKTIME_S``; Erlang's default: 60) so that
the nodes notice the silence in seconds; the product leaves the default
(docs/BROKERS.md).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cityedge_fleet.broker_rabbitmq_sync import RabbitCtl

from support import faults
from support.faults_cluster import ClusterFaultRig, node_partitioned, partition_cluster
from support.mosquitto import TestPKI
from support.rabbitmq import RABBIT_BIN

DEVICES = 6  # two per node


@pytest.fixture(scope="module")
def world() -> Iterator[SimpleNamespace]:
    base = Path(tempfile.mkdtemp(prefix="cityedge-rmq-part-"))
    base.chmod(0o755)
    pki = TestPKI(base / "pki")
    try:
        with faults.own_cluster() as pg:
            hosts, cluster = partition_cluster(pki, base / "rmq", DEVICES)
            try:
                yield SimpleNamespace(pki=pki, pg=pg, cluster=cluster)
            finally:
                cluster.stop()
                hosts.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_fleet_controls_nodes_on_other_hosts_by_their_long_names(
        world: SimpleNamespace) -> None:
    """The fleet's ``rabbitmqctl`` (``RabbitCtl``, as the reconciler and revocation run
    it) reaches nodes named ``name@10.213.x.y`` only with ``--longnames``, which it adds
    by itself; the first node may be away (the next one answers)."""
    c = world.cluster
    names = [n.name for n in c.nodes]
    ctl = RabbitCtl(names, ctl=RABBIT_BIN / "rabbitmqctl", home=c.home,
                    epmd_port=c.epmd_port, timeout_s=60.0)
    assert ctl.name_flags == ["--longnames"]
    running = ctl.run("eval", "lists:sort(rabbit_nodes:all_running()).")
    assert running.strip() == "[%s]" % ",".join("'%s'" % n for n in sorted(names))


def test_a_device_host_without_the_cookie_cannot_control_a_node(
        world: SimpleNamespace, tmp_path: Path) -> None:
    """A stolen device's machine, on the network the nodes listen on (as the devices and
    the test are here), reaches a node's epmd and distribution port; with its own
    cookie (not the cluster's) ``rabbitmqctl`` gets nothing from it: no command runs,
    the node's users are unchanged."""
    c = world.cluster
    home = tmp_path / "thief"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    env = {**c.env(), "HOME": str(home)}
    before = c.ctl("list_users", "--quiet")
    with pytest.raises(RuntimeError) as refused:
        c.ctl("add_user", "thief", "x", env=env)
    said = str(refused.value).lower()
    assert "authenticat" in said or "cookie" in said, said
    assert c.ctl("list_users", "--quiet") == before  # nothing added


def test_a_node_partitioned_from_the_others_pauses_rejoins_and_loses_nothing(
        world: SimpleNamespace) -> None:
    with ClusterFaultRig(world.pki, world.pg, world.cluster, devices=DEVICES) as fr:
        r = node_partitioned(fr)
    n = r.notes
    assert n["minority_paused_s"] is not None  # pause_minority acted
    # a PUBACK already on its way at the cut, at most one per device: nothing after it
    assert n["acked_on_minority"] <= n["devices_on_minority"]
    # more than one per device: batches sent after the cut, confirmed by the majority
    assert n["acked_on_majority"] > n["devices_on_majority"]
    assert n["majority_view"][0] == 2  # the majority saw node 1 gone
    assert n["reconnected"] == n["devices_on_minority"]
    assert n["views_after"] == [(3, [])] * 3  # all three back, no partition recorded
    faults.check_nothing_lost(r)
