"""The fleet rotates its command key, end to end over the real parts: Mosquitto with mTLS
and the fleet's CRL; the fleet on SQLite (API, command publisher, ingest worker as
``fleet serve`` runs them; the CLI as the security team runs it); the gateway service
built from its TOML, enrolled through ``/enroll``, trusting the fleet key enrollment gave
it and the fleet's root certificate.

The root signs the statement off the fleet (``command_key_rotation.announce`` with the
root key), the security officer rolls it out over the API (a technician may not), the
gateway installs it and answers ok, ``keys rotate-command-key --switch`` moves the fleet
to the new key once every device installed it, a command signed by the new key is
obeyed, and after the overlap a command signed by the old key is not.

A gateway enrolled *after* the rotation was rolled out installs the statement the
enrollment answer carries (``cityedge gateway install-trust``) and obeys the new key at
once, with no trust-update sent to it; a statement a thief on the fleet server put in
its place is refused at enrollment; a tampered or rolled-back buffer at a later start
makes the gateway obey no command until a technician installs the statement again."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from cityedge_core import cbor, command, topics, trust_statement
from cityedge_fleet import command_key, command_queue
from cityedge_fleet import command_key_rotation as ckr
from cityedge_fleet.ca import ROOT_KEY
from cityedge_fleet.models import CommandKeyRotation, CommandState, Role
from cityedge_gateway.config import load_config
from cityedge_gateway.enroll_trust import GatewayEnrollmentError, install_enrollment
from cityedge_host.crypto import EcSigner, public_sec1

from support.fleet import Api, wait_for
from support.fleet_world import fleet_world
from support.gateway import GW
from support.gateway_enroll import enroll_gateway as support_enroll
from support.gateway_run import RunningGateway
from support.mosquitto import TestPKI
from support.mqtt_probe import WAIT_S, Probe
from support.rotation import audit_actions, command_row

OVERLAP_S = 6  # seconds the old key stays trusted after the statement is made


@pytest.fixture
def world(pki: TestPKI) -> Iterator[SimpleNamespace]:
    from fastapi.testclient import TestClient

    from cityedge_fleet.app import create_app

    w = fleet_world(pki, None, "cityedge-cmdkey-", command_poll_s=0.2, command_resend_s=1.0,
                    command_absent_retry_s=0.5)
    app = create_app(w.settings, init_db=True)
    try:
        with TestClient(app) as client:
            yield SimpleNamespace(api=Api(client, w.settings), broker=w.broker,
                                  settings=w.settings, dir=w.dir, pki=pki)
    finally:
        app.state.broker_access.close()
        app.state.engine.dispose()
        w.broker.cleanup()
        shutil.rmtree(w.dir, ignore_errors=True)


def publish_command(link: Probe, payload: bytes) -> None:
    """Publish a command to the gateway once it is subscribed: a gateway just started may
    not be yet, and the broker then answers 0x10 (no subscriber) and drops it. Exactly
    one copy reaches the gateway (0: delivered)."""
    assert wait_for(lambda: link.publish(topics.down(GW, topics.CMD), payload) == 0, WAIT_S)


def enroll_gateway(w: SimpleNamespace, answer: Any = None) -> Path:
    config, _, _ = support_enroll(w.api, w.dir / "gw", 901, w.broker.port, w.pki.ca_pem,
                                  'key_file = "gateway.key"\nroot_cert = "root.crt"',
                                  (w.settings.ca_dir / "root.crt").read_bytes(), answer)
    return config


def offline_root(w: SimpleNamespace) -> Path:
    """The operator's offline root (here: the test CA's key, which the fleet's root.crt
    is)."""
    offline = w.dir / "offline"
    offline.mkdir(mode=0o700)
    (offline / ROOT_KEY).write_bytes(w.pki.ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (offline / ROOT_KEY).chmod(0o600)
    return offline


def roll_out(w: SimpleNamespace) -> tuple[Any, Any, ckr.Announced]:
    """The security team's rotation up to the rollout (before the switch): returns the
    old and new command keys and the root's statement (the old key kept an hour)."""
    old = command_key.load(w.settings.command_key_file)
    keygen = cli(w, "keys", "command-keygen")
    assert keygen.returncode == 0, keygen.stderr
    new = command_key.load(ckr.next_key_path(w.settings.command_key_file))
    until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    done = ckr.announce(offline_root(w), public_sec1(new.public_key),
                        old_point=public_sec1(old.public_key), keep_old_until=until)
    r = w.api.client.post("/command-key/rotations",
                          json={"statement": base64.b64encode(done.statement).decode()},
                          headers=w.api.headers(Role.security))
    assert r.status_code == 201, r.text
    return old, new, done


def trust_updates_to_gateway(w: SimpleNamespace) -> list[Any]:
    with Session(w.api.engine) as s:
        return [c for c in command_queue.of_device(s, GW, limit=50)
                if c.name == "trust-update"]


def send_status(w: SimpleNamespace) -> int:
    """``cityedge keys command GW status`` (signed by the fleet's key now): its id."""
    q = cli(w, "keys", "command", GW, "status")
    assert q.returncode == 0, q.stderr
    return int(q.stdout.split()[1])


def meta(config: Path, sql: str, *args: Any) -> None:
    with sqlite3.connect(config.parent / "buffer.sqlite") as db:
        db.execute(sql, args)


@pytest.fixture
def services(world: SimpleNamespace) -> Iterator[None]:
    from cityedge_fleet.command_publisher import CommandPublisher
    from cityedge_fleet.ingest import Ingestor
    from cityedge_fleet.ingest_mqtt import MqttIngestWorker

    publisher = CommandPublisher(world.api.engine, world.settings, rand=lambda: 0.5).start()
    worker = MqttIngestWorker(Ingestor(world.api.engine, world.settings,
                                       on_return=publisher.wake), world.settings).start()
    try:
        assert worker.subscribed.wait(WAIT_S)
        yield
    finally:
        worker.stop()
        publisher.stop()


def cli(w: SimpleNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    s = w.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update(CITYEDGE_MODE="development", CITYEDGE_DATABASE_URL=s.database_url,
               CITYEDGE_CA_DIR=str(s.ca_dir), CITYEDGE_AUDIT_KEY_FILE=str(s.audit_key_file),
               CITYEDGE_COMMAND_KEY_FILE=str(s.command_key_file))
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args], env=env,
                          cwd=w.dir, capture_output=True, text=True, timeout=60)


def rotation(w: SimpleNamespace) -> dict[str, Any]:
    r = w.api.client.get("/command-key/rotations", headers=w.api.headers(Role.security))
    assert r.status_code == 200, r.text
    return r.json()[0]  # type: ignore[no-any-return]


def test_the_fleet_moves_the_gateway_to_a_new_command_key(world: SimpleNamespace) -> None:
    w = world
    config = enroll_gateway(w)
    old = command_key.load(w.settings.command_key_file)  # what enrollment handed out
    # the operator's offline root (here: the test CA's key, which the fleet's root.crt is)
    offline = w.dir / "offline"
    offline.mkdir(mode=0o700)
    (offline / ROOT_KEY).write_bytes(w.pki.ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (offline / ROOT_KEY).chmod(0o600)

    from cityedge_fleet.command_publisher import CommandPublisher
    from cityedge_fleet.ingest import Ingestor
    from cityedge_fleet.ingest_mqtt import MqttIngestWorker

    publisher = CommandPublisher(w.api.engine, w.settings, rand=lambda: 0.5).start()
    worker = MqttIngestWorker(Ingestor(w.api.engine, w.settings, on_return=publisher.wake),
                              w.settings).start()
    assert worker.subscribed.wait(WAIT_S)
    gw = RunningGateway(config)
    try:
        keygen = cli(w, "keys", "command-keygen")
        assert keygen.returncode == 0, keygen.stderr
        new = command_key.load(ckr.next_key_path(w.settings.command_key_file))
        assert keygen.stdout.split()[-1] == public_sec1(new.public_key).hex()
        assert "PRIVATE" not in keygen.stdout
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=OVERLAP_S)
        done = ckr.announce(offline, public_sec1(new.public_key),
                            old_point=public_sec1(old.public_key), keep_old_until=until)
        body = {"statement": base64.b64encode(done.statement).decode()}
        # the security role only
        r = w.api.client.post("/command-key/rotations", json=body,
                              headers=w.api.headers(Role.technician))
        assert r.status_code == 403
        r = w.api.client.post("/command-key/rotations", json=body,
                              headers=w.api.headers(Role.security))
        assert r.status_code == 201, r.text
        assert (r.json()["devices"], r.json()["new_kid"]) == (1, new.kid.hex())
        assert wait_for(lambda: rotation(w)["installed"] == 1, WAIT_S * 2), rotation(w)
        trust = gw.gw.fleet_trust
        assert trust is not None and trust.version == done.version
        assert set(trust.trusted()) == {old.kid, new.kid}  # the overlap
        sw = cli(w, "keys", "rotate-command-key", "--switch")
        assert sw.returncode == 0, sw.stderr
        assert "switched" in sw.stdout and rotation(w)["state"] == "switched"
        assert command_key.load(w.settings.command_key_file).kid == new.kid
        assert command_key.load(ckr.retired_key_path(w.settings.command_key_file)
                                ).kid == old.kid
        # a command the CLI signs now is signed by the new key, and obeyed
        q = cli(w, "keys", "command", GW, "status")
        assert q.returncode == 0, q.stderr
        cmd_id = int(q.stdout.split()[1])
        assert command_row(w.api.engine, cmd_id).kid == new.kid.hex()
        assert wait_for(lambda: command_row(w.api.engine, cmd_id).state == CommandState.ok,
                        WAIT_S * 2), command_row(w.api.engine, cmd_id)
        # after the overlap, the old key (say, a copy the thief kept) is not obeyed
        assert wait_for(lambda: time.time() >= until.timestamp(), OVERLAP_S + WAIT_S)
        rejected = gw.gw.responder.stats.rejected  # type: ignore[union-attr]
        link = Probe(w.broker, w.pki.service("fleet-commands"))
        try:
            stale = command.encode_command(old, old.kid, "status", GW, 10_000,
                                           int(time.time()) + 600)
            publish_command(link, stale)
            assert wait_for(lambda: gw.gw.responder.stats.rejected  # type: ignore[union-attr]
                            > rejected, WAIT_S)
        finally:
            link.close()
        assert set(trust.trusted()) == {new.kid}
        actions = [a for a, _o in audit_actions(w.api.engine, "command_key.")]
        assert actions == ["command_key.next", "command_key.rotate", "command_key.switch"]
        with Session(w.api.engine) as s:  # the answer the fleet recorded is the gateway's
            cmds = [c for c in command_queue.of_device(s, GW, limit=10)
                    if c.name == "trust-update"]
        assert [c.state for c in cmds] == [CommandState.ok] and "installed" in \
            cmds[0].result_detail
    finally:
        gw.stop()
        worker.stop()
        publisher.stop()


def test_a_gateway_enrolled_after_a_rotation_obeys_the_new_key_at_once(
        world: SimpleNamespace, services: None) -> None:
    w = world
    old, new, done = roll_out(w)
    config = enroll_gateway(w)  # the answer's fleet_keys: the old key; its statement: both
    gw = RunningGateway(config)
    try:
        trust = gw.gw.fleet_trust
        assert trust is not None and trust.version == done.version and not trust.broken
        assert set(trust.trusted()) == {old.kid, new.kid}  # before any command reached it
        # the fleet switches (forced: it counts only trust-update answers as installed)
        sw = cli(w, "keys", "rotate-command-key", "--switch", "--force")
        assert sw.returncode == 0, sw.stderr
        cmd_id = send_status(w)
        assert command_row(w.api.engine, cmd_id).kid == new.kid.hex()
        assert wait_for(lambda: command_row(w.api.engine, cmd_id).state == CommandState.ok,
                        WAIT_S * 2), command_row(w.api.engine, cmd_id)
        assert trust_updates_to_gateway(w) == []  # enrollment alone moved it
    finally:
        gw.stop()


def test_a_statement_a_thief_puts_in_the_enrollment_answer_is_refused(
        world: SimpleNamespace, services: None) -> None:
    """The thief holds the fleet server (its database and the command key), not the
    root: the statement it makes the enrollment hand out names its own key, with a
    version above the real one, signed by the command key under the root's kid."""
    w = world
    old, new, done = roll_out(w)
    thief = EcSigner.generate()
    now = int(time.time())
    root_kid = trust_statement.open_statement(done.statement).kid
    forged = trust_statement.encode_statement(old, root_kid, done.version + 1,
                                              [(public_sec1(thief.public_key), None)],
                                              now - 60, now + 3600)
    with Session(w.api.engine) as s:
        row = s.get(CommandKeyRotation, 1)
        assert row is not None
        row.statement, row.version = forged, done.version + 1
        s.add(row)
        s.commit()
    with pytest.raises(GatewayEnrollmentError, match=r"refused, nothing installed: .*signature"):
        enroll_gateway(w)
    config = w.dir / "gw" / "gateway.toml"
    gw = RunningGateway(config)  # started anyway: the seed key, as the answer gave it
    try:
        trust = gw.gw.fleet_trust
        assert trust is not None and trust.version == 0
        assert set(trust.trusted()) == {old.kid}
        rejected = gw.gw.responder.stats.rejected  # type: ignore[union-attr]
        link = Probe(w.broker, w.pki.service("fleet-commands"))
        try:  # the thief's own key commands nothing
            bad = command.encode_command(thief, thief.kid, "status", GW, 10_000,
                                         int(time.time()) + 600)
            publish_command(link, bad)
            assert wait_for(lambda: gw.gw.responder.stats.rejected  # type: ignore[union-attr]
                            > rejected, WAIT_S)
        finally:
            link.close()
        assert new.kid not in trust.trusted()
    finally:
        gw.stop()


def test_a_tampered_or_rolled_back_buffer_at_start_obeys_no_command(
        world: SimpleNamespace, services: None) -> None:
    w = world
    old, new, done = roll_out(w)
    config = enroll_gateway(w)
    sw = cli(w, "keys", "rotate-command-key", "--switch", "--force")
    assert sw.returncode == 0, sw.stderr
    row = "cmd:trust_statement"
    # tampered: the thief, with write access to the buffer, names its own key
    thief = EcSigner.generate()
    tampered = done.statement.replace(public_sec1(new.public_key),
                                      public_sec1(thief.public_key))
    meta(config, "UPDATE meta SET value = ? WHERE key = ?", cbor.dumps(tampered.hex()), row)
    gw = RunningGateway(config)
    try:
        trust = gw.gw.fleet_trust
        assert trust is not None and "tampered" in trust.broken and trust.trusted() == {}
        cmd_id = send_status(w)  # signed by the new key: not obeyed, never answered
        assert wait_for(lambda: gw.gw.responder.stats.rejected > 0,  # type: ignore[union-attr]
                        WAIT_S * 2)
        assert command_row(w.api.engine, cmd_id).state != CommandState.ok
        assert gw.gw.responder.stats.accepted == 0  # type: ignore[union-attr]
    finally:
        gw.stop()
    # mended by the technician: the enrollment answer's statement installed again
    said = install_enrollment(load_config(config), {
        "trust_statement": base64.b64encode(done.statement).decode()})
    assert said.startswith("trust statement v%d installed" % done.version)
    gw = RunningGateway(config)
    try:
        assert not gw.gw.fleet_trust.broken  # type: ignore[union-attr]
        assert wait_for(lambda: command_row(w.api.engine, cmd_id).state == CommandState.ok,
                        WAIT_S * 3), command_row(w.api.engine, cmd_id)  # the fleet's resend
    finally:
        gw.stop()
    # rolled back to before the statement (the seed: the old key alone, no end to it)
    meta(config, "DELETE FROM meta WHERE key = ?", row)
    gw = RunningGateway(config)
    try:
        trust = gw.gw.fleet_trust
        assert trust is not None and "rolled back" in trust.broken
        assert trust.trusted() == {}
        link = Probe(w.broker, w.pki.service("fleet-commands"))
        try:  # a copy of the old key commands nothing
            stale = command.encode_command(old, old.kid, "status", GW, 20_000,
                                           int(time.time()) + 600)
            publish_command(link, stale)
            assert wait_for(lambda: gw.gw.responder.stats.rejected  # type: ignore[union-attr]
                            > 0, WAIT_S)
        finally:
            link.close()
        assert gw.gw.responder.stats.accepted == 0  # type: ignore[union-attr]
    finally:
        gw.stop()
