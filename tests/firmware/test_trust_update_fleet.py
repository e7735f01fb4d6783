"""A ``trust-update``'s answer reaches the fleet without the fleet sending it again: the
real fleet (API, command publisher, ingest worker on SQLite), a real mTLS Mosquitto and
the MicroPython agent on the unix port (code in ROMFS, ``fw_harness.HEAP``), rebooting as
a board does (``fw_harness.RebootingDevice``).

The security team rolls out the root's statement (``POST /command-key/rotations``): the
fleet queues a ``trust-update`` for the device and publishes it once. The agent keeps the
statement and resets; the next boot checks and installs it, signs the answer and keeps it
for the agent (``answers.keep_unsent``) and resets; the agent publishes it once connected
(``answers.publish_unsent``). The fleet's resend is an hour here, so the answer the fleet
records (``ok``, one send) can only have come from that publish.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from fw_harness import RebootingDevice
from mp_fleet import RESEND_S, enroll_mp, mp_config, stored
from sqlmodel import Session

from cityedge_fleet import command_key, command_queue
from cityedge_fleet import command_key_rotation as ckr
from cityedge_fleet.ca import ROOT_KEY
from cityedge_fleet.models import FleetCommand, Role
from cityedge_fw import trust_check
from cityedge_host.crypto import public_sec1

from support.fastfleet import Fleet, real_fleet
from support.fleet import wait_for
from support.mosquitto import TestPKI
from support.mqtt_probe import WAIT_S


@pytest.fixture
def fleet(tmp_path: Path, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet("sqlite:///%s" % (tmp_path / "fleet.sqlite3"), pki,
                    command_resend_s=RESEND_S, command_resend_max_s=RESEND_S) as f:
        yield f


def trust_updates(f: Fleet, device: str) -> list[FleetCommand]:
    with Session(f.api.engine) as s:
        rows = [c for c in command_queue.of_device(s, device, limit=50)
                if c.name == "trust-update"]
        for c in rows:
            s.expunge(c)
        return rows


def test_the_trust_update_answer_is_published_once_connected_without_a_resend(
        fleet: Fleet, mpy_dir: Path, tmp_path: Path) -> None:
    f = fleet
    dev = enroll_mp(f, 1, tmp_path)
    stop = tmp_path / "stop"
    device = RebootingDevice(mpy_dir, mp_config(f, dev, tmp_path, {"file": str(stop)}),
                             stop).start()
    try:
        assert wait_for(lambda: stored(f, dev.id)[1] >= 2, 3 * WAIT_S), stored(f, dev.id)
        # the operator's offline root: the test CA's key, which the device's tls.ca is
        offline = tmp_path / "offline"
        offline.mkdir(mode=0o700)
        (offline / ROOT_KEY).write_bytes(f.pki.ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        old = command_key.load(f.settings.command_key_file)
        new = ckr.keygen(f.settings.command_key_file)  # `keys command-keygen`
        done = ckr.announce(offline, public_sec1(new.public_key),
                            old_point=public_sec1(old.public_key),
                            keep_old_until=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        r = f.api.client.post("/command-key/rotations",
                              json={"statement": base64.b64encode(done.statement).decode()},
                              headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        assert wait_for(lambda: [str(c.state) for c in trust_updates(f, dev.id)] == ["ok"],
                        4 * WAIT_S), (trust_updates(f, dev.id), device.log())
        cmd = trust_updates(f, dev.id)[0]
        assert cmd.sends == 1, cmd  # recorded from the agent's publish, not a resend
        assert "installed" in cmd.result_detail, cmd
        # streaming went on after the two boots
        at_answer = stored(f, dev.id)[1]
        assert wait_for(lambda: stored(f, dev.id)[1] >= at_answer + 2, 3 * WAIT_S)
    finally:
        device.stop()
    log = device.log()
    assert "Traceback" not in log and "MemoryError" not in log, log
    held = trust_check.installed(str(tmp_path / "state.cbor.trust"))
    assert held is not None and held[2] == done.statement
    # published once, then removed: a later boot does not publish it again
    assert not (tmp_path / "state.cbor.unpublished").exists()
    assert len(device.outputs) >= 3, log  # the agent, the boot that checked, the agent
