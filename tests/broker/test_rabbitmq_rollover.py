"""An intermediate CA rollover on the RabbitMQ deployment, against a real node configured
as ``cityedge broker config --engine rabbitmq`` writes it (TLS with ``crl_check peer``: a
certificate whose issuer has no CRL in the node's hash directory is refused), started
before the rollover.

During the overlap the fleet's CRL file holds two CRLs, one per intermediate. Each must be
installed under its own issuer's hash name by the fleet's live path
(``RabbitAccess.install_crl``, one ``rabbitmqctl eval``), and ``ca rollover`` must do so
before its switch: with only the first one installed (the defect fixed here), or none
before the switch (``ca rollover`` only knew Mosquitto's SIGHUP), every device of the new
intermediate is refused. And when an intermediate leaves the fleet's file (retirement), its
CRL leaves the nodes, so its devices are refused again."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from types import SimpleNamespace

from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet import revocation
from cityedge_fleet.broker_rabbitmq_sync import RabbitAccess, RabbitCtl
from cityedge_fleet.ca import ROOT_CERT, CertificateAuthority, Revoked
from cityedge_fleet.ca_rollover import rollover
from cityedge_fleet.config import Settings

from support.fleet_ca import FleetPKI, device, rollover_world
from support.rabbit_devices import MqttTry
from support.rabbitmq import RABBIT_BIN, RabbitCluster

ATTEMPTS = 20  # connection attempts a CRL change may take to be seen (each a handshake)


def test_both_intermediates_crls_reach_the_node_and_a_retired_one_leaves() -> None:
    world, root_dir, ca_dir, files = rollover_world("cityedge-rmqroll-")
    pki = FleetPKI(ca_dir, files)
    old_a, old_x = device(ca_dir, files, 1), device(ca_dir, files, 2)
    new_cns = ["urn:dev:mac:0024befffe80%04x" % n for n in (3, 4)]
    # the cluster as configured before the rollover: one intermediate, one CRL
    ca = CertificateAuthority(ca_dir)
    cluster = RabbitCluster(pki, [old_a.cn, old_x.cn, *new_cns],  # type: ignore[arg-type]
                            count=1, directory=world / "rmq", crl_file=ca.crl_path)
    node = cluster.nodes[0]
    access = RabbitAccess(RabbitCtl([node.name], ctl=RABBIT_BIN / "rabbitmqctl",
                                    home=cluster.home, epmd_port=cluster.epmd_port,
                                    timeout_s=60.0), ca.crl_path)
    crl_dir = cluster.dir / "conf" / rmq.CRL_DIR
    settings = Settings(
        mode="development", database_url="sqlite:///%s" % (world / "fleet.sqlite3"),
        ca_dir=ca_dir, broker_engine="rabbitmq", broker_rabbitmq_nodes=node.name,
        broker_rabbitmq_home=cluster.home, broker_rabbitmq_ctl=RABBIT_BIN / "rabbitmqctl",
        broker_rabbitmq_epmd_port=cluster.epmd_port, audit_key_file=world / "audit.key",
        command_key_file=world / "command.key")

    def connects(dev: SimpleNamespace) -> bool:
        t = MqttTry(node.mqtt_port, dev.cert_pem, dev.key_pem, ca_dir / ROOT_CERT, dev.cn)
        try:
            return t.wait_connected()
        finally:
            t.close()

    def settles(cond: Callable[[], bool], what: str) -> None:
        for _ in range(ATTEMPTS):
            if cond():
                return
        raise AssertionError("not after %d connections: %s" % (ATTEMPTS, what))

    try:
        cluster.start()
        assert connects(old_a)
        # the rollover while the node runs, with `ca rollover`'s hook before the switch
        # (``revocation.tell_broker`` with the fleet's RabbitMQ settings): the nodes get
        # the new CRL file (two CRLs) by eval; no node restart, no new bundle (the device
        # sends its intermediate, which chains to the root the node trusts)
        told: list[bool] = []
        done = rollover(root_dir, ca_dir, before_switch=lambda: told.append(
            revocation.tell_broker(settings, ca.crl_path)))
        assert told == [True]
        ca = CertificateAuthority(ca_dir)
        assert len(rmq.crl_hash_files(ca.crl_path)) == 2  # the overlap: one CRL per issuer
        assert sorted(p.name for p in crl_dir.iterdir()) == sorted(
            n for n, _ in rmq.crl_hash_files(ca.crl_path))
        assert set(access.install_crl().values()) == {"same"}  # the hook put them there
        new_b, new_y = device(ca_dir, files, 3), device(ca_dir, files, 4)
        assert [new_b.cn, new_y.cn] == new_cns
        assert new_b.issuer == done.new_id != old_a.issuer
        assert connects(new_b), "a device of the new intermediate is refused"
        assert connects(old_a), "a device of the old intermediate is refused"

        # the live path: one certificate of each intermediate revoked, installed by eval
        now = ca.cert.not_valid_before_utc
        ca.write_crl([Revoked(old_x.serial, now), Revoked(new_y.serial, now)], 3600)
        assert set(access.install_crl().values()) == {"written"}
        assert set(access.install_crl().values()) == {"same"}  # nothing changed
        settles(lambda: not connects(old_x), "the old intermediate's revoked certificate")
        settles(lambda: not connects(new_y), "the new intermediate's revoked certificate")
        assert connects(old_a) and connects(new_b)

        # the old intermediate leaves the fleet's file (as ``ca retire`` leaves it): its
        # CRL leaves the node and its devices are refused; the new one's still connect
        new = ca.signer
        assert new.id == done.new_id
        ca.crl_path.write_bytes(ca.make_crl([Revoked(new_y.serial, now)], 3600, issuer=new))
        assert set(access.install_crl().values()) == {"written"}
        assert [p.name for p in crl_dir.iterdir()] == [
            n for n, _ in rmq.crl_hash_files(ca.crl_path)]
        settles(lambda: not connects(old_a), "a device of the retired intermediate")
        assert connects(new_b) and not connects(new_y)
    finally:
        cluster.stop()
        shutil.rmtree(world, ignore_errors=True)
