"""The real broker, configured as `cityedge broker config` writes it, against a device in
an attacker's hands: mTLS, identity = CN, client id = CN, subscriptions checked, CRL.

Each attack runs against a real Mosquitto with the dynamic security plugin. The first test
runs the shared-subscription attack against the configuration this project used before
(Mosquitto's ``acl_file`` with ``%u`` patterns) to show the attack is real there.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cityedge_core import topics
from cityedge_fleet import broker_acl

from support.mosquitto import SHARE_GROUP, Mosquitto, TestPKI
from support.mqtt_probe import Probe

DEVICE = "urn:dev:mac:0024befffe804ff1"
OTHER = "urn:dev:mac:0024befffe804ff2"
SHARED = "$share/%s/%s" % (SHARE_GROUP, topics.every_up(topics.READINGS))
BATCHES = 20


def _publish_cli(broker: Mosquitto, pki: TestPKI, creds: object, topic: str) -> int:
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(pki.ca_pem),
         "--cert", str(creds.cert_pem), "--key", str(creds.key_pem),  # type: ignore[attr-defined]
         "-t", topic, "-m", "x", "-q", "1"],
        capture_output=True, timeout=20).returncode


def _steal_shares(broker: Mosquitto, pki: TestPKI) -> tuple[bool, int]:
    """A device joins the ingest's shared subscription while another device publishes
    ``BATCHES`` batches: (was the join granted, batches the ingest received)."""
    ingest = Probe(broker, pki.service("fleet-ingest"))
    thief = Probe(broker, pki.issue_client(DEVICE))
    sender = Probe(broker, pki.issue_client(OTHER))
    try:
        assert ingest.subscribe(SHARED)
        joined = thief.subscribe(SHARED)
        for i in range(BATCHES):
            assert sender.publish(topics.up(OTHER, topics.READINGS), b"batch %d" % i) == 0
        # all acknowledged. Messages reach one subscriber in order: once a later sentinel
        # reaches the ingest, every batch routed to it has arrived too
        for _ in range(BATCHES):
            assert sender.publish(topics.up(OTHER, topics.READINGS), b"sentinel") == 0
            if any(m == b"sentinel" for _t, m in ingest.messages):
                break
        ingest.wait_for(lambda: any(m == b"sentinel" for _t, m in ingest.messages),
                        "a sentinel")
        got = [m for _t, m in ingest.messages if m.startswith(b"batch")]
        return joined, len(got)
    finally:
        for p in (ingest, thief, sender):
            p.close()


def test_the_shared_subscription_attack_works_against_a_plain_acl_file(pki: TestPKI,
                                                                         tmp_path: Path) -> None:
    """Mosquitto's acl_file grants every SUBSCRIBE: the device joins the ingest's share and
    the batches routed to it are dropped at delivery (its read rule) though acknowledged."""
    broker = Mosquitto(pki)
    acl = broker.dir / "acl"
    acl.write_text("pattern write ce/v1/%u/up/#\npattern read ce/v1/%u/down/#\n"
                   "user fleet-ingest\ntopic read ce/v1/+/up/#\n"
                   "topic read $share/+/ce/v1/+/up/#\n")
    acl.chmod(0o644)
    conf = broker.conf.read_text()
    conf = "\n".join(line for line in conf.splitlines()
                     if not line.startswith(("plugin", "use_username_as_clientid")))
    broker.conf.write_text(conf.replace("allow_anonymous false",
                                        "allow_anonymous false\nacl_file %s" % acl) + "\n")
    broker.start()
    try:
        joined, received = _steal_shares(broker, pki)
    finally:
        broker.cleanup()
    assert joined
    assert received < BATCHES  # acknowledged batches lost


def test_a_device_cannot_join_the_ingests_shared_subscription(pki: TestPKI,
                                                              tmp_path: Path) -> None:
    broker = Mosquitto(pki, clients=[DEVICE, OTHER]).start()
    try:
        joined, received = _steal_shares(broker, pki)
    finally:
        broker.cleanup()
    assert not joined
    assert received == BATCHES


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_a_device_subscribes_only_to_its_own_down_topics(pki: TestPKI, tmp_path: Path,
                                                         v5: bool) -> None:
    broker = Mosquitto(pki, clients=[DEVICE, OTHER]).start()
    dev = Probe(broker, pki.issue_client(DEVICE), v5=v5)
    try:
        for own in (topics.down(DEVICE, topics.CMD), topics.down(DEVICE, topics.DESIRED),
                    "ce/v1/%s/down/#" % DEVICE):
            assert dev.subscribe(own), own
        for foreign in ("$share/any-group-name/ce/v1/+/up/readings", "$share/x/#", "#",
                        "ce/v1/+/up/#", "ce/v1/+/down/cmd", topics.down(OTHER, topics.CMD),
                        topics.up(OTHER, topics.READINGS), "$CONTROL/dynamic-security/v1/#",
                        "$SYS/#", "ce/v1/%s/up/readings" % DEVICE):
            assert not dev.subscribe(foreign), foreign
    finally:
        dev.close()
        broker.cleanup()


def test_a_device_publishes_only_under_its_own_id(pki: TestPKI, tmp_path: Path) -> None:
    broker = Mosquitto(pki, clients=[DEVICE, OTHER]).start()
    ingest = Probe(broker, pki.service("fleet-ingest"))
    dev = Probe(broker, pki.issue_client(DEVICE))
    try:
        assert ingest.subscribe(SHARED)
        denied = 135  # MQTT 5 "not authorized"
        assert dev.publish(topics.up(OTHER, topics.READINGS), b"forged") == denied
        assert dev.publish(topics.down(OTHER, topics.CMD), b"forged") == denied
        assert dev.publish(topics.down(DEVICE, topics.CMD), b"own cmd") == denied
        assert dev.publish(broker_acl.CONTROL_TOPIC, b'{"commands":[]}') == denied
        assert dev.publish(topics.up(DEVICE, topics.READINGS), b"own") == 0
        ingest.wait_for(lambda: len(ingest.messages) >= 1, "the device's own batch")
        assert ingest.messages == [(topics.up(DEVICE, topics.READINGS), b"own")]
    finally:
        for p in (ingest, dev):
            p.close()
        broker.cleanup()


@pytest.mark.parametrize("victim", ["fleet-ingest", OTHER])
def test_a_device_cannot_take_over_another_clients_session(pki: TestPKI, tmp_path: Path,
                                                           victim: str) -> None:
    """Connecting with the victim's client id once closed the victim's connection."""
    broker = Mosquitto(pki, clients=[DEVICE, OTHER]).start()
    creds = pki.service(victim) if victim.startswith("fleet") else pki.issue_client(victim)
    target = Probe(broker, creds, client_id=victim)
    thief = Probe(broker, pki.issue_client(DEVICE), client_id=victim)
    try:
        assert thief.publish(topics.up(DEVICE, topics.STATUS), b"hi") < 0x80  # 0x10: nobody
        # the victim is still connected: it completes a round trip on its own session
        probe_topic = (SHARED if victim.startswith("fleet")
                       else topics.down(OTHER, topics.CMD))
        assert target.subscribe(probe_topic)
        assert target.disconnects == 0 and thief.disconnects == 0
        assert "closing old connection" not in broker.read_log()
    finally:
        for p in (target, thief):
            p.close()
        broker.cleanup()


def test_the_ingest_identity_can_do_nothing_but_read_its_share(pki: TestPKI,
                                                               tmp_path: Path) -> None:
    broker = Mosquitto(pki).start()
    ingest = Probe(broker, pki.service("fleet-ingest"))
    try:
        assert ingest.publish(topics.up(DEVICE, topics.READINGS), b"x") == 135
        assert ingest.publish(topics.down(DEVICE, topics.CMD), b"x") == 135
        assert ingest.subscribe("ce/v1/+/up/readings")  # plain: a lone worker's
        assert not ingest.subscribe("ce/v1/#")
        assert not ingest.subscribe(topics.every_down(topics.CMD))
        assert not ingest.subscribe("$share/other-group/ce/v1/+/up/readings")
    finally:
        ingest.close()
        broker.cleanup()


def test_cutting_a_device_closes_its_live_session_and_refuses_it(pki: TestPKI,
                                                                 tmp_path: Path) -> None:
    broker = Mosquitto(pki, clients=[DEVICE]).start()
    dev = Probe(broker, pki.issue_client(DEVICE))
    try:
        assert dev.publish(topics.up(DEVICE, topics.READINGS), b"before") < 0x80
        broker.cut(DEVICE)
        dev.wait_for(lambda: dev.disconnects >= 1, "the broker closing the session")
        again = Probe(broker, pki.issue_client(DEVICE))  # its certificate is still valid,
        try:  # but it may do nothing any more
            assert again.publish(topics.up(DEVICE, topics.READINGS), b"after") == 135
            assert not again.subscribe(topics.down(DEVICE, topics.CMD))
        finally:
            again.close()
    finally:
        dev.close()
        broker.cleanup()


def test_certificate_from_another_ca_is_refused(mosquitto: Mosquitto, pki: TestPKI,
                                                tmp_path: Path) -> None:
    rogue = TestPKI(tmp_path / "rogue", ca_name="rogue CA")
    creds = rogue.issue_client(DEVICE)
    mosquitto.grant(DEVICE)  # the name is known: only the CA decides
    assert _publish_cli(mosquitto, pki, creds, topics.up(DEVICE, topics.READINGS)) != 0


def test_revoked_certificate_refused_after_reload(pki: TestPKI) -> None:
    dev = pki.issue_client(OTHER)
    broker = Mosquitto(pki, crl=True, clients=[OTHER]).start()
    try:
        assert _publish_cli(broker, pki, dev, topics.up(OTHER, topics.READINGS)) == 0
        pki.revoke(dev)
        pki.write_crl(broker.crl_path)
        broker.reload()
        assert _publish_cli(broker, pki, dev, topics.up(OTHER, topics.READINGS)) != 0
    finally:
        pki.revoked.clear()
        broker.cleanup()


def test_plain_connection_without_certificate_refused(mosquitto: Mosquitto) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    try:
        c.connect("127.0.0.1", mosquitto.port, keepalive=5)
        rc = c.loop(timeout=5.0)
        connected = c.is_connected() and rc == 0
    except (OSError, ssl.SSLError):
        connected = False
    assert not connected


def test_a_packet_larger_than_any_batch_disconnects_its_sender(pki: TestPKI) -> None:
    """A device cannot make the broker hold a megabyte per message."""
    broker = Mosquitto(pki, clients=[DEVICE]).start()
    ingest = Probe(broker, pki.service("fleet-ingest"))
    dev = Probe(broker, pki.issue_client(DEVICE))
    try:
        assert ingest.subscribe(SHARED)
        dev.client.publish(topics.up(DEVICE, topics.READINGS), b"x" * 1_000_000, qos=1)
        dev.wait_for(lambda: dev.disconnects >= 1, "the broker dropping the connection")
        again = Probe(broker, pki.issue_client(DEVICE))
        try:
            assert again.publish(topics.up(DEVICE, topics.READINGS), b"small") < 0x80
            ingest.wait_for(lambda: len(ingest.messages) >= 1, "the small batch")
        finally:
            again.close()
        assert [m for _t, m in ingest.messages] == [b"small"]
    finally:
        ingest.close()
        dev.close()
        broker.cleanup()


def test_the_ingests_queue_holds_more_than_mosquittos_default_thousand(pki: TestPKI) -> None:
    """With Mosquitto's default (1000 queued per client) the batches beyond it, sent while
    the ingest was away, were dropped although every sender had its PUBACK."""
    broker = Mosquitto(pki, clients=[DEVICE]).start()
    sent = 1500
    try:
        ingest = _session(broker, pki)
        assert ingest.subscribe(SHARED)
        ingest.close()  # the ingest restarts; its session stays with the broker
        dev = Probe(broker, pki.issue_client(DEVICE))
        try:
            for i in range(sent):
                dev.client.publish(topics.up(DEVICE, topics.READINGS), b"%d" % i, qos=1)
            dev.wait_for(lambda: len(dev.pubacks) == sent, "every PUBACK")
        finally:
            dev.close()
        back = _session(broker, pki)
        try:
            back.wait_for(lambda: len(back.messages) >= sent, "every queued batch", timeout=60)
            assert sorted(int(m) for _t, m in back.messages) == list(range(sent))
        finally:
            back.close()
    finally:
        broker.cleanup()


def test_a_device_cannot_queue_more_than_max_queued_bytes_for_the_away_ingest(
        pki: TestPKI) -> None:
    """A stolen device floods large batches while the ingest is away: the broker queues at
    most ``max_queued_bytes`` for the ingest (its memory stays bounded whatever the
    messages' sizes) and drops the rest, although it acknowledged them: the price of the
    bound (docs/SECURITY.md, "Broker queues"). Production's bound: 1 GiB."""
    limit, size, sent = 64_000, 8_000, 40
    broker = Mosquitto(pki, clients=[DEVICE], extra="max_queued_bytes %d" % limit)
    # production's line (cityedge_fleet.broker), then this test's smaller one: the last wins
    assert "max_queued_bytes %d" % (1 << 30) in broker.conf.read_text()
    broker.start()
    plain = topics.every_up(topics.READINGS)
    try:
        ingest = _session(broker, pki)
        assert ingest.subscribe(plain)
        ingest.close()  # away; its session (and subscription) stays with the broker
        dev = Probe(broker, pki.issue_client(DEVICE))
        try:
            for i in range(sent):
                dev.client.publish(topics.up(DEVICE, topics.READINGS),
                                   b"%04d" % i + b"x" * (size - 4), qos=1)
            dev.wait_for(lambda: len(dev.pubacks) == sent, "every PUBACK")
            back = _session(broker, pki)
            try:
                # in order: once the sentinel sent now has arrived, so has every queued one
                assert dev.publish(topics.up(DEVICE, topics.READINGS), b"sentinel") == 0
                back.wait_for(lambda: any(m == b"sentinel" for _t, m in back.messages),
                              "the sentinel")
                kept = [m for _t, m in back.messages if m != b"sentinel"]
            finally:
                back.close()
        finally:
            dev.close()
    finally:
        broker.cleanup()
    assert 0 < sum(len(m) for m in kept) <= limit
    assert [int(m[:4]) for m in kept] == list(range(len(kept)))  # the first ones, in order
    assert len(kept) < sent


def _session(broker: Mosquitto, pki: TestPKI) -> Probe:
    """The ingest with a persistent session (as ``MqttIngestWorker`` connects)."""
    return Probe(broker, pki.service("fleet-ingest"), session_expiry_s=3600)
