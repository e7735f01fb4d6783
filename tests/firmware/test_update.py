"""Device updates end to end on the MicroPython unix port (``ota_harness``): the real
agent streaming to a real mTLS Mosquitto, a signed ``update`` command, the release served
over HTTPS with Range (``support.artifact_server``), the A/B slots and the boot selector.

- N -> N+1 while streaming: every batch of every boot arrives in one unbroken chain (no
  reading lost to the resets), the new release boots on trial, commits once a batch of
  its own is acknowledged, and reports its version; the installed sequence moves;
- a release that cannot reach the broker in its trial rolls itself back and the old
  release reports why;
- a download cut mid-body, and a device reset mid-download, resume from where they
  stopped (the server's log shows the Range requests).
"""

from __future__ import annotations

import json
import re
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from fw_harness import DEVICE, Subscriber, check_chain, wait_for
from ota_harness import (
    FleetUpdateCommands,
    Releases,
    UpdatingDevice,
    build_release,
    status_maps,
    update_command,
    updates,
)

from cityedge_core import command
from cityedge_core.command_decode import decode_result
from cityedge_fw import update_boot, update_slots
from cityedge_host.crypto import EcSigner, EcVerifier, public_sec1

from support.artifact_server import ArtifactServer
from support.linkproxy import LinkProxy
from support.mosquitto import Mosquitto, TestPKI

OLD, NEW = "1.0.0", "1.1.0"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, micropython: str, mpy_cross: str
           ) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("releases")
    return {v: build_release(out, v) for v in (OLD, NEW)}


class World:
    def __init__(self, tmp: Path, broker: Mosquitto, pki: TestPKI) -> None:
        self.tmp = tmp
        self.broker = broker
        self.pki = pki
        self.creds = pki.issue_client(DEVICE)
        broker.grant(DEVICE)
        self.fleet = EcSigner.generate()
        self.fleet_key = tmp / "fleet.pub"
        self.fleet_key.write_bytes(public_sec1(self.fleet.public_key))
        self.releases = Releases(tmp)
        self.sub = Subscriber(broker, pki)
        self.fleet_side = FleetUpdateCommands(self.creds)  # the fleet's result rules
        self.cmd_seq = 0
        import paho.mqtt.client as paho
        from mp_fleet import fleet_publisher

        self.pub: paho.Client = fleet_publisher(broker, pki)

    def send(self, payload: bytes) -> None:
        info = self.pub.publish("ce/v1/%s/down/cmd" % DEVICE, payload, qos=1)
        info.wait_for_publish(10)

    def update(self, server: ArtifactServer, manifest: bytes) -> bytes:
        self.cmd_seq += 1
        self.fleet_side.sent(self.cmd_seq)
        cmd = update_command(self.fleet, self.cmd_seq, folder(server), manifest)
        self.send(cmd)
        return cmd

    def results(self, seq: int) -> list[tuple[bytes, Any]]:
        """(signed bytes, decoded result) of every answer to command ``seq`` so far."""
        verifier = EcVerifier(self.creds.key.public_key())
        out = []
        for data in self.sub.results():
            res = decode_result(data, verifier)
            if res.seq == seq:
                out.append((data, res))
        return out

    def result(self, dev: UpdatingDevice, seq: int, timeout: float = 120) -> tuple[bytes, Any]:
        """The device's first signed answer to ``update`` command ``seq``, taken by the
        fleet's result rules (``FleetUpdateCommands``)."""
        dev.wait_for(lambda: self.results(seq), timeout)
        data, res = self.results(seq)[0]
        assert self.fleet_side.take(data) == "result", res
        return data, res

    def close(self) -> None:
        self.pub.disconnect()
        self.pub.loop_stop()
        self.sub.close()


def folder(server: ArtifactServer) -> str:
    return "https://localhost:%d/releases/%s/" % (server.port, "r")


def serve(world: World, image: Path, manifest: bytes, mode: str = "normal",
          keys: bytes | None = None) -> ArtifactServer:
    return ArtifactServer(world.pki, image.read_bytes(), mode,
                          files={"manifest": manifest, "keys": keys or world.releases.keys})


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto, pki: TestPKI) -> Any:
    w = World(tmp_path, mosquitto, pki)
    yield w
    w.close()


def last_update(world: World) -> tuple[str, Any]:
    found = updates(world.sub.status())
    return found[-1] if found else ("", None)


def wait_update(world: World, dev: UpdatingDevice, state: str, timeout: float = 120
                ) -> tuple[str, Any]:
    try:
        dev.wait_for(lambda: (last_update(world)[1] or [None])[0] == state, timeout)
    except AssertionError as e:
        shown = status_maps(world.sub.status())[-3:]
        raise AssertionError("%s\nstatuses: %s" % (e, shown)) from None

    return last_update(world)


def test_device_updates_while_streaming_commits_and_reports_the_new_version(
        world: World, images: dict[str, Path]) -> None:
    man = world.releases.manifest(images[NEW], NEW, 2)
    dev = UpdatingDevice(world.tmp, world.broker, world.pki, world.creds, images[OLD],
                         world.releases, world.fleet_key).start()
    try:
        with serve(world, images[NEW], man) as server:
            dev.wait_for(lambda: len(world.sub.readings()) >= 2, 60)
            cmd = world.update(server, man)
            dev.wait_for(lambda: len(dev.boots) >= 3, 120)
            world.send(cmd)  # the fleet sends it again mid-update: not answered (below)
            fw, upd = wait_update(world, dev, "committed", 180)
            assert (fw, upd) == (NEW, ["committed", NEW, 2, ""]), world.sub.status()
            data, res = world.result(dev, 1)
            assert (res.name, res.outcome) == ("update", "ok"), res
            assert res.data == {"state": "committed", "version": NEW, "sequence": 2}, res
            assert world.fleet_side.member_status(1) == ("committed", "")
            world.send(cmd)  # a resend after the answer: the kept answer, the same bytes
            dev.wait_for(lambda: len(world.results(1)) >= 2, 60)
            assert {d for d, _r in world.results(1)} == {data}
            arts = [r for p, r in zip(server.paths, server.log, strict=True)
                    if p.endswith("artifact")]
            size = images[NEW].stat().st_size
            step = update_boot.RANGE_BYTES  # the default: no ``update.range_bytes``
            assert arts[0] == "bytes=0-%d" % (step - 1) and len(arts) == -(-size // step), arts
        before = len(world.sub.readings())
        wait_for(lambda: len(world.sub.readings()) >= before + 2, 60)
    finally:
        dev.stop()
    # the selector's slot per boot: N takes the command, its agent keeps it in
    # ``update.json``, then boots fetch the manifest, check it, download and install (a
    # reset after each, no agent built in them); then N+1 on trial commits
    assert dev.boots[:6] == ["a", "a", "a", "a", "a", "b"], (dev.boots, dev.log())
    assert set(dev.boots[5:]) == {"b"}
    stages = re.findall(r"update: boot stage (\w+) took (\d+) ms", dev.log())
    assert [s for s, _ms in stages] == ["scheduled", "downloading"], dev.log()
    # no agent (no sampling) from the boot that takes the kept command (the second) to
    # the trial's agent (the seventh: the sixth hands it the watch): the readings
    # collected before were sealed (the chain below has no gap)
    pause = dev.started[6] - dev.started[1]
    p = dev.pointer()
    assert (p["slot"], p["seq"], p["version"], p["trial"]) == ("b", 2, NEW, None), p
    assert "MemoryError" not in dev.log(), dev.log()
    seqs = check_chain(world.sub.readings(), world.creds)  # no batch lost to the resets
    assert seqs == list(range(1, len(seqs) + 1))
    # the stages the statuses showed (a status every 2 s: not every stage) in their order
    order = ["scheduled", "checking", "downloading", "installing", "trial", "committed"]
    states = [order.index(u[0]) for _fw, u in updates(world.sub.status()) if u]
    assert states == sorted(states) and states[-1] == 5, updates(world.sub.status())
    # never refused as a replay while it ran; the fleet takes the answer once
    assert [r.outcome for _d, r in world.results(1)] == ["ok", "ok"]
    assert world.fleet_side.take(data) == "result_duplicate"
    peak = [int(x) for x in re.findall(r"update: download heap peak (\d+)", dev.log())]
    print("update heap: download peak %s bytes in use at %s; boot stages %s ms; no "
          "agent for %.1f s (boots 2-6)" % (peak, dev.heap, [int(ms) for _s, ms in stages],
                                            pause))


def test_a_forged_or_replayed_update_result_is_refused_by_the_fleets_rules(pki: TestPKI
                                                                         ) -> None:
    """What the device's answer protects: a result signed by another key under the
    device's kid is a forgery; the device's own answer taken once is a duplicate the
    second time (a replay changes nothing); an answer for a seq never sent, or naming
    another command, is not taken; and a ``rolled-back`` answer cannot be turned into
    ``ok`` (the outcome is signed)."""
    creds = pki.issue_client(DEVICE)
    device = EcSigner(creds.key)
    fleet = FleetUpdateCommands(creds)
    fleet.sent(4)
    data = {"state": "rolled-back", "version": NEW, "sequence": 2}
    honest = command.encode_result(device, device.kid, "update", DEVICE, 4, "failed",
                                   "health: broker not reached", data)
    forger = EcSigner.generate()
    forged = command.encode_result(forger, device.kid, "update", DEVICE, 4, "ok",
                                   "committed", dict(data, state="committed"))
    assert fleet.take(forged) == "bad_signature"
    assert fleet.take(command.encode_result(forger, forger.kid, "update", DEVICE, 4, "ok",
                                            "")) == "unknown_key"
    assert fleet.take(honest.replace(b"failed", b"passed")) == "bad_signature"  # altered
    assert fleet.take(command.encode_result(device, device.kid, "update", DEVICE, 9, "ok",
                                            "")) == "unknown_command"
    assert fleet.take(command.encode_result(device, device.kid, "rotate", DEVICE, 4, "ok",
                                            "")) == "result_mismatch"
    assert fleet.take(honest) == "result"
    assert fleet.member_status(4) == ("rolled-back", "rolled back: health: broker not "
                                      "reached")
    assert fleet.take(honest) == "result_duplicate"  # replayed: recorded once
    later = command.encode_result(device, device.kid, "update", DEVICE, 4, "ok", "")
    assert fleet.take(later) == "result_conflict"  # kept aside, the first answer stands
    assert fleet.member_status(4)[0] == "rolled-back"


def test_a_release_that_cannot_reach_the_broker_is_rolled_back_by_the_device(
        tmp_path: Path, mosquitto: Mosquitto, pki: TestPKI, images: dict[str, Path]) -> None:
    world = World(tmp_path, mosquitto, pki)
    proxy = LinkProxy(mosquitto.port).start()
    try:
        man = world.releases.manifest(images[NEW], NEW, 2)

        class Via:
            port = proxy.port

        dev = UpdatingDevice(world.tmp, Via, pki, world.creds, images[OLD], world.releases,
                             world.fleet_key)
        dev.update_conf(trial_s=10)
        dev.start()
        try:
            with serve(world, images[NEW], man) as server:
                dev.wait_for(lambda: len(world.sub.readings()) >= 2, 60)
                world.update(server, man)
                wait_for(lambda: "b" in dev.boots, 180)
                proxy.cut()  # the new release never reaches the broker
                wait_for(lambda: dev.pointer().get("last") is not None, 120)
                proxy.restore()
                fw, upd = wait_update(world, dev, "rolled-back", 120)
                _data, res = world.result(dev, 1)
        finally:
            dev.stop()
        assert fw == OLD
        assert upd[:3] == ["rolled-back", NEW, 2] and "broker not reached" in upd[3], upd
        # decided by the trial release, which reset with no link: signed and sent by the
        # old release at its next start
        assert res.outcome == "failed" and "broker not reached" in res.detail, res
        assert res.data == {"state": "rolled-back", "version": NEW, "sequence": 2}, res
        assert world.fleet_side.member_status(1)[0] == "rolled-back"
        p = dev.pointer()
        assert (p["slot"], p["seq"], p["trial"]) == ("a", 0, None), p
        i = dev.boots.index("b")
        # rolled back by itself at its deadline, not by the selector: the boot that hands
        # the watch to the agent, the agent's, the boot that rolls back, then the old one
        assert dev.boots[i:i + 4] == ["b", "b", "b", "a"], dev.boots
        seqs = check_chain(world.sub.readings(), world.creds)
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        proxy.close()
        world.close()


def test_a_release_that_crashes_at_every_boot_is_rolled_back_by_the_boot_selector(
        world: World, images: dict[str, Path], tmp_path: Path) -> None:
    """The new release cannot even start its agent (so nothing of it can roll back):
    the selector's trial boots, counted down on flash before each boot, run out and it
    boots the old release, which reports why."""
    broken = build_release(tmp_path, "1.2.0", crash=True)
    man = world.releases.manifest(broken, "1.2.0", 3)
    dev = UpdatingDevice(world.tmp, world.broker, world.pki, world.creds, images[OLD],
                         world.releases, world.fleet_key).start()
    try:
        with serve(world, broken, man) as server:
            dev.wait_for(lambda: len(world.sub.readings()) >= 2, 60)
            world.update(server, man)
            fw, upd = wait_update(world, dev, "rolled-back", 180)
            _data, res = world.result(dev, 1)
    finally:
        dev.stop()
    assert fw == OLD
    assert upd[:3] == ["rolled-back", "1.2.0", 3] and "did not commit" in upd[3], upd
    # decided by the boot selector: the old release signs and sends the result
    assert res.outcome == "failed" and "did not commit" in res.detail, res
    assert res.data == {"state": "rolled-back", "version": "1.2.0", "sequence": 3}, res
    assert world.fleet_side.member_status(1)[0] == "rolled-back"
    i = dev.boots.index("b")
    n = update_slots.TRIAL_BOOTS
    assert dev.boots[i:i + n + 1] == ["b"] * n + ["a"], dev.boots  # its trial boots, then a
    assert "a broken release" in dev.log()
    p = dev.pointer()
    assert (p["slot"], p["seq"], p["trial"]) == ("a", 0, None), p
    seqs = check_chain(world.sub.readings(), world.creds)
    assert seqs == list(range(1, len(seqs) + 1))


def test_an_interrupted_download_resumes_from_where_it_stopped(
        world: World, images: dict[str, Path]) -> None:
    """A link lost mid-body (the server drops the connection), then a device reset in the
    middle of the download: each time the next request starts where the bytes on flash
    end, not at 0."""
    man = world.releases.manifest(images[NEW], NEW, 2)
    dev = UpdatingDevice(world.tmp, world.broker, world.pki, world.creds, images[OLD],
                         world.releases, world.fleet_key)
    dev.update_conf(range_bytes=8192)  # many requests: the power cut lands mid-way
    dev.start()
    size = images[NEW].stat().st_size
    try:
        with serve(world, images[NEW], man) as server:
            server.cut_after = 5000  # the first artifact response stops at byte 5000
            dev.wait_for(lambda: len(world.sub.readings()) >= 2, 60)
            world.update(server, man)
            wait_for(lambda: sum(p.endswith("artifact") for p in server.paths) >= 3, 120)
            dev.kill()  # a power cut mid-download
            fw, upd = wait_update(world, dev, "committed", 180)
            arts = [r for p, r in zip(server.paths, server.log, strict=True)
                    if p.endswith("artifact")]
    finally:
        dev.stop()
    assert (fw, upd[0]) == (NEW, "committed")
    # the link lost at byte 5000: the next request starts there
    assert arts[:2] == ["bytes=0-8191", "bytes=5000-13191"], arts
    starts = [int(r.split("=")[1].split("-")[0]) for r in arts]
    # never a restart: each request starts where the bytes on flash end, never before the
    # one before (a range the power cut took in flight is asked again, from its start:
    # what the server sent was not on flash yet), never at 0 again; the last one ends at
    # the artifact's end
    assert starts == sorted(starts) and starts.count(0) == 1, arts
    assert all(b - a <= 8192 for a, b in pairwise(starts)), arts
    assert arts[-1].endswith("-%d" % (size - 1)) or int(arts[-1].split("-")[1]) >= size - 1
    assert "resumed at" in dev.log(), dev.log()


# (case, expected reason) — the attacks of the TUF/Uptane/SUIT threat lists a device must
# refuse, and the servers it must survive. The device has sequence 5 installed.
ATTACKS = [
    ("rollback", "rollback"),  # an older release, validly signed
    ("replay", "replay"),  # the installed release again
    ("expired", "expired"),  # a frozen manifest
    ("other_hw_class", "wrong_hw_class"),  # mix-and-match
    ("unknown_release_key", "unknown_key"),
    ("revoked_release_key", "unknown_key"),  # left out of a newer root-signed list
    ("fleet_key_without_release_key", "unknown_key"),  # a stolen fleet server's key
    ("keys_under_threshold", "keys_threshold"),  # 1 root signature, 2 needed
    ("manifest_not_the_commands", "manifest_digest"),
    ("tampered_artifact", "artifact_digest"),
    ("artifact_too_long", "artifact_too_long"),  # endless data
    ("wrong_content_range", "download:"),
    ("trickling_server", "download:"),  # slow retrieval: bounded by the request timeout
]


@pytest.mark.parametrize(("case", "reason"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_update_attacks_are_refused_and_nothing_installs(
        world: World, images: dict[str, Path], case: str, reason: str) -> None:
    rel = world.releases
    image = images[NEW]
    seq, key, hw, expires, keys, mode = 6, rel.key, "unix-test", None, rel.keys, "normal"
    body = image.read_bytes()
    if case == "rollback":
        seq = 4
    elif case == "replay":
        seq = 5
    elif case == "expired":
        expires = int(time.time()) - 60
    elif case == "other_hw_class":
        hw = "esp32-s3"
    elif case == "unknown_release_key":
        key = EcSigner.generate()
    elif case == "revoked_release_key":
        keys = rel.certify([EcSigner.generate()], version=2)  # the new list drops it
    elif case == "fleet_key_without_release_key":
        key = world.fleet
    elif case == "keys_under_threshold":
        keys = rel.certify([rel.key], version=2, signers=1)
    elif case == "tampered_artifact":
        body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
    elif case == "artifact_too_long":
        mode = "endless-declared"
    elif case == "wrong_content_range":
        mode = "wrong-range"
    elif case == "trickling_server":
        mode = "trickle"
    man = rel.manifest(image, NEW, seq, key=key, hw=hw, expires=expires)
    named = man
    if case == "manifest_not_the_commands":
        named = rel.manifest(image, NEW, seq + 1)  # another valid release
    dev = UpdatingDevice(world.tmp, world.broker, world.pki, world.creds, images[OLD],
                         world.releases, world.fleet_key)
    (dev.flash / "boot.json").write_text(json.dumps(
        {"slot": "a", "seq": 5, "version": OLD, "keys": 1}))
    if case == "trickling_server":
        dev.update_conf(request_ms=1000)
    dev.start()
    try:
        with ArtifactServer(world.pki, body, mode,
                            files={"manifest": man, "keys": keys}) as server:
            dev.wait_for(lambda: len(world.sub.readings()) >= 2, 60)
            world.cmd_seq += 1
            world.fleet_side.sent(world.cmd_seq)
            world.send(update_command(world.fleet, world.cmd_seq, folder(server), named))
            fw, upd = wait_update(world, dev, "failed", 150)
            _data, res = world.result(dev, world.cmd_seq)
            served = sum(len(body) for p in server.paths if p.endswith("artifact"))
    finally:
        dev.stop()
    assert fw == OLD
    assert upd[0] == "failed" and upd[3].startswith(reason), upd
    # the signed result: a release the rules refuse is ``refused`` with the reason code,
    # a download that did not succeed ``failed``; the campaign counts either as failed
    assert res.detail.startswith(reason), res
    assert res.outcome == ("failed" if reason.startswith(("artifact", "download"))
                           else "refused"), res
    assert world.fleet_side.member_status(world.cmd_seq)[0] == "failed"
    assert "b" not in dev.boots, dev.boots  # the new slot never booted
    p = dev.pointer()
    assert (p["slot"], p["seq"], p["version"], p["trial"]) == ("a", 5, OLD, None), p
    if reason not in ("artifact_digest", "artifact_too_long", "download:"):
        assert served == 0  # refused on the manifest: not a byte of the artifact asked for
    image_b = dev.flash / "slot_b" / "firmware.romfs"
    if reason.startswith("artifact"):
        assert not image_b.exists()  # nothing of a refused artifact stays
    assert image_b.stat().st_size <= len(image.read_bytes()) if image_b.exists() else True


def test_the_esp32_partition_writer_compiles_for_the_board(tmp_path: Path, mpy_cross: str
                                                           ) -> None:
    """Compile-checked only (no ESP32 here): ``mpy-cross`` takes it as a board build does,
    and it is in the freeze manifest a board image is built from."""
    from cityedge import build_firmware
    from cityedge_host import mpy

    out = tmp_path / "update_partition.mpy"
    mpy.compile_file(build_firmware.FIRMWARE / "cityedge_fw" / "update_partition.py", out,
                     "cityedge_fw.update_partition")
    assert out.read_bytes()[:1] == b"M"  # an .mpy file
    assert "update_partition.py" in build_firmware.manifest_text()
