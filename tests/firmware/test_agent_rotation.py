"""Key rotation of the MicroPython agent end to end: the real agent on the unix port (code
in ROMFS; the rotation at ``ROTATION_HEAP``, the attacks at ``fw_harness.HEAP``), rebooting
as a board does (``fw_harness.RebootingDevice``), a real Mosquitto (mTLS, the fleet's CRL,
dynamic security) and the real fleet (API, ingest worker, command publisher) on SQLite and
PostgreSQL (``support.fastfleet.real_fleet``), whose resend is an hour here: every answer
and the CSR reach it from the agent's own publish (``answers.publish_unsent``).

- Rotated while it streams: each command is kept by the agent, carried out by the next
  boot (``rotation_device.at_boot``) and its CSR and answer published by the agent after
  it; the fleet's rotation reaches ``old-revoked``; no batch lost or refused across the
  switch; one unbroken chain (the first batch under the new key links to the last under
  the old); the broker refuses the old certificate afterwards; the old key is gone from
  the device's flash; every command answered ``ok`` with a signed result, each sent once;
  the running agent interns no name (no pool of names added: the rotation's modules load
  at boot only).
- A forged, a replayed, an expired and another device's ``rotate`` are refused: nothing
  changes on the flash; the replayed and the expired are answered ``refused`` with the
  gate's reason, signed by the device (the forged and the foreign are not answered).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fw_harness import RebootingDevice, finish, qstr_pools, result, start_device
from mp_fleet import (
    RESEND_S,
    ROTATION_HEAP,
    enroll_mp,
    mp_config,
    stored,
)
from sqlmodel import Session, col, select

from cityedge_core import chain, command
from cityedge_core.command_decode import decode_result
from cityedge_fleet import command_key, rotation_ingest
from cityedge_fleet.models import FleetCommand, IngestEvent, Role
from cityedge_host.crypto import EcSigner, EcVerifier

from support import pg
from support.fastfleet import Fleet, real_fleet, refused_at_the_broker
from support.fleet import wait_for
from support.mosquitto import OBSERVER, TestPKI
from support.mqtt_probe import WAIT_S, Probe


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[pg.PgCluster]:
    try:
        with pg.pg_cluster() as cluster:
            yield cluster
    except pg.PgError as e:
        pytest.fail(str(e))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The fleet's database, as the fleet tests' (``tests/fleet/conftest.py``)."""
    if request.param == "sqlite":
        return "sqlite:///%s" % (tmp_path / "fleet.sqlite3")
    cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet(db_url, pki, command_resend_s=RESEND_S,
                    command_resend_max_s=RESEND_S) as f:
        yield f


def rotation_state(f: Fleet, device: str) -> str:
    rows = f.api.client.get("/devices/%s/rotations" % device,
                            headers=f.api.headers(Role.viewer)).json()
    return str(rows[0]["state"]) if rows else "-"


def commands(f: Fleet, device: str) -> list[tuple[str, str]]:
    rows = f.api.client.get("/devices/%s/commands" % device,
                            headers=f.api.headers(Role.viewer)).json()
    return sorted((str(c["name"]), str(c["state"])) for c in rows)


def events(f: Fleet, device: str) -> list[str]:
    with Session(f.api.engine) as s:
        return [e.status for e in s.exec(select(IngestEvent).where(
            col(IngestEvent.device_id) == device))]


def flash_files(dev: SimpleNamespace) -> list[str]:
    return sorted(p.name for p in dev.files.iterdir())


def sends(f: Fleet, device: str) -> list[tuple[str, int]]:
    """(name, times the fleet published it) of each of the device's commands."""
    with Session(f.api.engine) as s:
        return sorted((c.name, c.sends) for c in s.exec(select(FleetCommand).where(
            col(FleetCommand.device_id) == device)))


def test_a_streaming_micropython_device_is_rotated_without_losing_a_batch(
        fleet: Fleet, mpy_dir: Path, tmp_path: Path) -> None:
    f = fleet
    dev = enroll_mp(f, 1, tmp_path)
    stop_file = tmp_path / "stop"
    device = RebootingDevice(mpy_dir, mp_config(f, dev, tmp_path, {"file": str(stop_file)}),
                             stop_file, ROTATION_HEAP).start()
    try:
        assert wait_for(lambda: stored(f, dev.id)[1] >= 3, 3 * WAIT_S), stored(f, dev.id)
        r = f.api.client.post("/devices/%s/rotate" % dev.id,
                              headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        assert wait_for(lambda: rotation_state(f, dev.id) == "old-revoked", 4 * WAIT_S), \
            (rotation_state(f, dev.id), commands(f, dev.id), device.log())
        at_revoked = stored(f, dev.id)[1]
        assert wait_for(lambda: stored(f, dev.id)[1] >= at_revoked + 3, 3 * WAIT_S)
    finally:
        device.stop(120)
    log = device.log()
    assert "Traceback" not in log and "MemoryError" not in log, log
    # the first agent; then per command a boot that carries it out and the agent after it
    assert len(device.outputs) == 7, log
    out = result(device.outputs[-1])
    assert out is not None, device.outputs[-1]
    qstr = qstr_pools(device.outputs[-1])
    print("rotation at %s: boot %d B, most in use %d B, least free %d B, names %r"
          % (ROTATION_HEAP, out["boot_alloc"], out["max_alloc"], out["min_free"], qstr))
    # a command whose gate finds no room is checked again later (``mem_errors``, as in
    # the commands test): each is still answered once (``sends`` below)
    for boot in device.outputs[:-1:2]:  # the agents that took a command and reset
        assert "RESET mem_errors=" in boot, boot
        pools = qstr_pools(boot)
        assert len(pools) == 2 and pools[1][0] == pools[0][0], boot  # no pool added
    assert qstr_pools(device.outputs[-1])[-1][0] == qstr_pools(device.outputs[-1])[0][0]
    for boot in device.outputs[1::2]:  # the boots that carried a command out
        assert ": ok: " in boot and "qstr pool" not in boot, boot
    assert out["stored"] == 0, out  # every batch it signed was acknowledged
    assert wait_for(lambda: stored(f, dev.id)[1] == out["seq"], WAIT_S)
    # none lost, none refused: every batch stored once, no gap, one chain across the keys
    assert stored(f, dev.id) == (out["seq"], out["seq"], 0)
    assert set(events(f, dev.id)) <= {chain.DUPLICATE, rotation_ingest.CSR_TAKEN}
    assert events(f, dev.id).count(rotation_ingest.CSR_TAKEN) == 1
    # every rotation command answered ok by a signed result the ingest verified, each
    # published once by the fleet: the answers and the CSR came from the agent's publish
    assert commands(f, dev.id) == [("erase-key", "ok"), ("install-cert", "ok"),
                                   ("rotate", "ok")]
    assert sends(f, dev.id) == [("erase-key", 1), ("install-cert", 1), ("rotate", 1)]
    # the old key is gone from the flash: slot 1 is current, slot 0 erased
    assert flash_files(dev) == ["cert.der.1", "fleet0.pub", "key.der.1", "key.der.slot"]
    assert (dev.files / "key.der.slot").read_bytes() == b".1"
    assert not list(tmp_path.glob("state.cbor.*new")), list(tmp_path.iterdir())
    assert not (tmp_path / "state.cbor.unpublished").exists()
    assert refused_at_the_broker(f, dev.first)  # the CRL was re-signed and reloaded


def _rotate(fleet_signer: EcSigner, target: str, seq: int, expires: int) -> bytes:
    return command.encode_command(fleet_signer, fleet_signer.kid, "rotate", target, seq,
                                  expires, {1: 7})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_forged_replayed_expired_and_foreign_rotate_commands_are_refused(
        fleet: Fleet, mpy_dir: Path, tmp_path: Path) -> None:
    """The attacks are published with the fleet's command identity at the broker (a
    broker compromise, or the fleet's own channel replayed): only the device's gate stands
    between them and its keys. What the device answers is read on ``up/result``."""
    f = fleet
    dev = enroll_mp(f, 2, tmp_path)
    fleet_key = command_key.load(f.settings.command_key_file)
    rogue = EcSigner.generate()
    watcher = Probe(f.broker, f.pki.service(OBSERVER))
    assert watcher.subscribe("ce/v1/%s/up/result" % dev.id)
    link: Probe | None = None
    stop_file = tmp_path / "stop"
    proc = start_device(mpy_dir, mp_config(f, dev, tmp_path, {"file": str(stop_file)}))
    now = int(time.time())

    def results() -> list[bytes]:
        return [p for _t, p in watcher.messages]

    try:
        assert wait_for(lambda: stored(f, dev.id)[1] >= 2, 3 * WAIT_S)
        # the fleet's own status command takes seq 1, answered ok (and replayed below)
        r = f.api.client.post("/devices/%s/commands" % dev.id, json={"name": "status"},
                              headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        assert wait_for(lambda: commands(f, dev.id) == [("status", "ok")], 3 * WAIT_S), \
            commands(f, dev.id)
        before = flash_files(dev)
        # the fleet's own publisher leaves the broker before the attacker takes its
        # identity (it has nothing left to send: the status is answered, its resend is an
        # hour). The client id is the certificate's CN and the broker keeps one connection
        # per id: the two would take it from each other, this probe getting it back only
        # after its 60 s reconnect delay (every publish below waited that long)
        f.publisher.stop()
        link = Probe(f.broker, f.pki.service("fleet-commands"))
        topic = "ce/v1/%s/down/cmd" % dev.id
        for data in (
            _rotate(rogue, dev.id, 50, now + 600),  # forged: a key the device does not trust
            _rotate(fleet_key, "urn:dev:mac:0024befffe80ffff", 51, now + 600),  # foreign
            _rotate(fleet_key, dev.id, 52, now - 5),  # expired
            _rotate(fleet_key, dev.id, 1, now + 600),  # a replay of a taken seq
        ):
            assert link.publish(topic, data) == 0
        watcher.wait_for(lambda: len(results()) >= 3, "the answers")
    finally:
        stop_file.touch()
        # a command that finds no room for the gate's decoders is checked again later
        # (``mem_errors``), as in the commands test: each is still answered once
        out = finish(proc, 120, mem_errors_ok=True)
        if link is not None:
            link.close()
        watcher.close()
    assert flash_files(dev) == before  # no key made, nothing moved
    assert out["commands"] == 1, out  # the status only
    got = results()
    verifier = EcVerifier(dev.signer.public_key)
    answered = [decode_result(data, verifier) for data in got]  # signed by the device
    assert [(a.seq, a.name, a.outcome) for a in answered] == [
        (1, "status", "ok"), (52, "rotate", "refused"), (1, "status", "ok")], answered
    assert "expired" in answered[1].detail
    assert got[2] == got[0]  # the replay: the answer kept for seq 1, byte for byte
