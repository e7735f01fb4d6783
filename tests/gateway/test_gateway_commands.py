"""The Pi gateway answers fleet commands through a real TLS Mosquitto with the production
rules: the gateway service as ``cityedge gateway run`` builds it from its TOML (trusting
the fleet key file the fleet lists), commands published as the ``fleet-commands``
identity, answers read by an observer and verified with the gateway's key.

What a stolen device or the broker may send (forged, another device's, expired) gets no
obedience; a command the fleet re-sends gets the same signed answer, also after the
gateway restarts, so the fleet never sees two answers to one command."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cityedge_core import cbor, command, command_decode, cose, topics
from cityedge_gateway.config import load_config
from cityedge_gateway.service import Gateway
from cityedge_host.crypto import EcSigner, KeyFileError, public_sec1

from support.gateway import GW
from support.gateway_run import RunningGateway
from support.mosquitto import OBSERVER, Mosquitto, TestPKI
from support.mqtt_probe import Probe

DELIVERED = 0  # PUBACK reason: the gateway's subscription was there
RESULTS = topics.up(GW, topics.RESULT)
STATUS = topics.up(GW, topics.STATUS)
CMD = topics.down(GW, topics.CMD)


@pytest.fixture
def world(tmp_path: Path, pki: TestPKI) -> Iterator[dict[str, Any]]:
    broker = Mosquitto(pki, clients=[GW]).start()
    creds = pki.issue_client(GW)
    creds.key_pem.chmod(0o600)
    signer = EcSigner.generate()
    signer.save(tmp_path / "gw.key")
    fleet = EcSigner.generate()
    # the trust store as the fleet lists it (GET /ca/fleet-keys): SEC1 in hex
    (tmp_path / "fleet0.pub").write_text(public_sec1(fleet.verifier().public_key).hex() + "\n")
    (tmp_path / "gateway.toml").write_text("""
[gateway]
device = "%s"
key_file = "gw.key"
fleet_keys = ["fleet0.pub"]

[store]
path = "buffer.sqlite"

[broker]
host = "127.0.0.1"
port = %d
ca_file = "%s"
cert_file = "%s"
key_file = "%s"
keepalive_s = 5
""" % (GW, broker.port, pki.ca_pem, creds.cert_pem, creds.key_pem))
    watcher = Probe(broker, pki.service(OBSERVER))
    assert watcher.subscribe(RESULTS) and watcher.subscribe(STATUS)
    fleet_link = Probe(broker, pki.service("fleet-commands"))
    try:
        yield {"broker": broker, "config": tmp_path / "gateway.toml", "signer": signer,
               "fleet": fleet, "watcher": watcher, "fleet_link": fleet_link}
    finally:
        watcher.close()
        fleet_link.close()
        broker.cleanup()


def sign(fleet: EcSigner, name: str, seq: int, target: str = GW, ttl_s: int = 600,
         args: Any = None) -> bytes:
    return command.encode_command(fleet, fleet.kid, name, target, seq,
                                  int(time.time()) + ttl_s, args)


def deliver(w: dict[str, Any], data: bytes) -> None:
    """Publish as the fleet's publisher does: again until the gateway's subscription was
    there to take it (PUBACK reason 0; 16 means it was not connected yet)."""
    for _ in range(200):
        if w["fleet_link"].publish(CMD, data) == DELIVERED:
            return
        time.sleep(0.1)
    raise AssertionError("the gateway never subscribed to its down/cmd")


def answers(w: dict[str, Any]) -> list[bytes]:
    return [p for t, p in w["watcher"].messages if t == RESULTS]


def next_answer(w: dict[str, Any], before: int) -> command_decode.Result:
    w["watcher"].wait_for(lambda: len(answers(w)) > before, "an answer")
    got = answers(w)
    assert len(got) == before + 1, "one command, one answer"
    return command_decode.decode_result(got[-1], w["signer"].verifier())


def test_the_gateway_obeys_answers_and_refuses_through_the_broker(world: dict[str, Any]) -> None:
    w, fleet = world, world["fleet"]
    gw = RunningGateway(w["config"])
    try:
        deliver(w, sign(fleet, "status", 1))
        ok = next_answer(w, 0)
        assert (ok.name, ok.device, ok.seq, ok.outcome) == ("status", GW, 1, command.OK)
        assert ok.detail == "status sent"
        w["watcher"].wait_for(lambda: any(t == STATUS for t, _ in w["watcher"].messages),
                              "the signed status")
        status = next(p for t, p in w["watcher"].messages if t == STATUS)
        _kid, _prot, payload, _sig = cose.split_sign1(status, 4096)
        assert cbor.loads(payload)["commands"]["enabled"] is True

        deliver(w, sign(fleet, "reboot-now", 2))
        unknown = next_answer(w, 1)
        assert (unknown.seq, unknown.outcome) == (2, command.REFUSED)
        assert "not supported" in unknown.detail

        # forged (another key), another device's, and a genuine one: only the last answered
        rogue = EcSigner.generate()
        deliver(w, command.encode_command(rogue, rogue.kid, "status", GW, 3,
                                          int(time.time()) + 600))
        deliver(w, sign(fleet, "status", 3, target="urn:dev:mac:0024befffe800001"))
        deliver(w, sign(fleet, "status", 3))
        third = next_answer(w, 2)
        assert (third.seq, third.outcome) == (3, command.OK)
        stats = gw.gw.responder.stats  # type: ignore[union-attr]
        assert (stats.rejected, stats.foreign, stats.accepted) == (1, 1, 3)

        # expired: refused with the reason, and not taken (the seq is still free)
        deliver(w, sign(fleet, "status", 4, ttl_s=-5))
        expired = next_answer(w, 3)
        assert (expired.seq, expired.outcome) == (4, command.REFUSED)
        assert "expired" in expired.detail
        deliver(w, sign(fleet, "status", 4))
        assert next_answer(w, 4).outcome == command.OK

        # the fleet re-sends a command whose answer it lost: the same signed answer
        first = answers(w)[0]
        deliver(w, sign(fleet, "status", 1))
        w["watcher"].wait_for(lambda: len(answers(w)) == 6, "the repeated answer")
        assert answers(w)[5] == first
    finally:
        gw.stop()

    kept = answers(w)[4]  # seq 4's answer
    again = RunningGateway(w["config"])  # restarted on the same buffer
    try:
        deliver(w, sign(fleet, "status", 4))
        w["watcher"].wait_for(lambda: len(answers(w)) == 7, "the answer after a restart")
        assert answers(w)[6] == kept
        deliver(w, sign(fleet, "status", 3))  # below the last taken: refused, not obeyed
        w["watcher"].wait_for(lambda: len(answers(w)) == 8, "the older repeat's answer")
        assert answers(w)[7] == answers(w)[2]
        assert again.gw.responder.stats.accepted == 0  # type: ignore[union-attr]
    finally:
        again.stop()


def test_without_a_fleet_key_the_gateway_takes_no_commands(world: dict[str, Any]) -> None:
    w = world
    config: Path = w["config"]
    config.write_text(config.read_text().replace('fleet_keys = ["fleet0.pub"]\n', ""))
    gw = RunningGateway(config)
    try:
        assert gw.gw.responder is None and gw.gw.forwarder is not None
        assert gw.gw.forwarder.on_command is None
    finally:
        gw.stop()


def test_without_key_slots_rotation_commands_are_refused_with_the_reason(
        world: dict[str, Any]) -> None:
    w, fleet = world, world["fleet"]
    gw = RunningGateway(w["config"])
    try:
        for seq, name in enumerate(("rotate", "install-cert", "erase-key"), 1):
            deliver(w, sign(fleet, name, seq, args={1: 5, 2: b"\x01"}))
            got = next_answer(w, seq - 1)
            assert (got.name, got.outcome) == (name, command.REFUSED)
            assert "identity_dir" in got.detail
        assert [t for t, _p in w["watcher"].messages if t.endswith("/up/csr")] == []
    finally:
        gw.stop()


def test_key_slots_refuse_two_different_initial_keys(world: dict[str, Any]) -> None:
    """With identity_dir one key signs and connects: a gateway.key_file that is not the
    broker's key is a mistake the first start names (nothing is moved)."""
    config: Path = world["config"]
    config.write_text(config.read_text().replace(
        'fleet_keys = ["fleet0.pub"]\n', 'fleet_keys = ["fleet0.pub"]\nidentity_dir = "id"\n'))
    with pytest.raises(KeyFileError, match="different keys"):
        Gateway(load_config(config))
    assert not (config.parent / "id" / "current").exists()
    assert (config.parent / "gw.key").exists()
