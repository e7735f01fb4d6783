"""A RabbitMQ node restarted after the fleet cut a device does not bring the device back.

Every node loads ``definitions.json`` (the registry's view as of the last ``broker config``)
at boot. Loaded every time, it restores the users of devices cut since (quarantined,
retired), until the reconciler's next round: the attack is a cut device reconnecting to a
node that was just restarted. The nodes load it only when it changed since the cluster
last imported it (``definitions.skip_if_unchanged``), so a restart keeps the cut, and a
file written again by ``broker config`` is still taken at the next boot."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet.broker_rabbitmq_sync import RabbitAccess, RabbitCtl

from support.mosquitto import TestPKI
from support.rabbitmq import RABBIT_BIN, RabbitCluster

A, B, C = ("urn:dev:mac:0024befffe90%04x" % n for n in (1, 2, 3))
STOP_TIMEOUT_S = 120


def test_a_restarted_node_keeps_a_cut_device_out_and_takes_a_new_definitions_file(
) -> None:
    world = Path(tempfile.mkdtemp(prefix="cityedge-rmqrestart-"))
    world.chmod(0o755)
    pki = TestPKI(world / "pki")
    cluster = RabbitCluster(pki, ["fleet-ingest", A, B], count=1, directory=world / "rmq")
    access = RabbitAccess(RabbitCtl([cluster.nodes[0].name], ctl=RABBIT_BIN / "rabbitmqctl",
                                    home=cluster.home, epmd_port=cluster.epmd_port,
                                    timeout_s=60.0))

    def restart() -> None:
        cluster.ctl("stop")  # a clean stop, as systemd's
        proc = cluster.procs[0]
        assert proc is not None
        proc.wait(STOP_TIMEOUT_S)
        cluster.start_node(0)
        cluster.wait_listening(0)
        cluster.ctl("await_startup")

    try:
        cluster.start()
        assert {A, B} <= access.clients()
        access.cut(A)  # the fleet quarantines A
        assert A not in access.clients()
        restart()
        assert A not in access.clients(), "the restarted node brought a cut device back"
        assert B in access.clients()
        # `broker config` run again (the registry now: B and a new C; A still cut)
        rmq.write(world / "rmq" / "conf", cluster.files, cluster.nodes, bind="127.0.0.1",
                  identities=["fleet-ingest", B, C])
        restart()
        assert C in access.clients(), "a changed definitions file was not loaded at boot"
        assert A not in access.clients() and B in access.clients()
    finally:
        cluster.stop()
        shutil.rmtree(world, ignore_errors=True)
