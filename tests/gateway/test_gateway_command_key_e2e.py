"""The fleet rotates its command key, end to end over the real parts: Mosquitto with mTLS
and the fleet's CRL; the fleet on SQLite (API, command publisher, ingest worker as
``fleet serve`` runs them; the CLI as the security team runs it); the gateway service
built from its TOML, enrolled through ``/enroll``, trusting the fleet key enrollment gave
it and the fleet's root certificate.

The root signs the statement off the fleet (``command_key_rotation.announce`` with the
root key), the security officer rolls it out over the API (a technician may not), the
gateway installs it and answers ok, ``keys rotate-command-key --switch`` moves the fleet
to the new key once every device installed it, a command signed by the new key is
obeyed, and after the overlap a command signed by the old key is not."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
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

from cityedge_core import command, topics
from cityedge_fleet import command_key, command_queue
from cityedge_fleet import command_key_rotation as ckr
from cityedge_fleet.ca import ROOT_KEY
from cityedge_fleet.models import CommandState, Role
from cityedge_host.crypto import public_sec1

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


def enroll_gateway(w: SimpleNamespace) -> Path:
    config, _, _ = support_enroll(w.api, w.dir / "gw", 901, w.broker.port, w.pki.ca_pem,
                                  'key_file = "gateway.key"\nroot_cert = "root.crt"',
                                  (w.settings.ca_dir / "root.crt").read_bytes())
    return config


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
            assert link.publish(topics.down(GW, topics.CMD), stale) == 0
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
