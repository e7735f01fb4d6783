"""A CA rollover end to end over the real broker and the real fleet (API, ingest worker,
command publisher, campaign runner; SQLite) with fast CPython devices streaming all along:
the rollover switches the running fleet to the new intermediate, a campaign selected by
``intermediate=<old id>`` moves every device onto it without a refused batch, ``ca
retire`` then refuses while the fleet's own service certificates are the old
intermediate's, and once it retires the old one the devices reconnect with their new
certificates and their batches are stored. (Here the first intermediate is the test PKI's
CA, which is also the root; tests/fleet/test_fleet_ca_rollover_broker.py has distinct ones.)"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, func, select

from cityedge.fastdevice import FastDevice
from cityedge_fleet import ca_retire, command_key, revocation
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.ca_retire import RetireRefused
from cityedge_fleet.ca_rollover import rollover
from cityedge_fleet.campaign import CampaignLimits
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.campaign_store import current_credentials
from cityedge_fleet.models import Reading, Role

from support.fastfleet import DeviceLoop, Fleet, enroll_fast, real_fleet
from support.fleet import wait_for
from support.mosquitto import TestPKI
from support.mqtt_probe import WAIT_S

N = 4


@pytest.fixture
def fleet(db_url: str, pki: TestPKI) -> Iterator[Fleet]:
    with real_fleet(db_url, pki, command_absent_retry_s=1.0) as f:
        yield f


def _root_dir(f: Fleet, pki: TestPKI) -> Path:
    """The test PKI's CA is the fleet's root (and its first intermediate)."""
    root = f.world / "root"
    root.mkdir()
    (root / "root.key").write_bytes(pki.ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    shutil.copy(pki.ca_pem, root / "root.crt")
    return root


def _broker_trusts_the_ca_directory(f: Fleet) -> None:
    """Point the broker's cafile at the CA directory's bundle, as `broker config` does."""
    ca = CertificateAuthority(f.settings.ca_dir)
    bundle = ca.write_broker_bundle()
    conf = f.broker.conf.read_text().replace("cafile %s" % f.pki.ca_pem.resolve(),
                                             "cafile %s" % bundle.resolve())
    assert "cafile %s" % bundle.resolve() in conf
    f.broker.conf.write_text(conf)
    f.broker.restart()


def _stored(f: Fleet) -> int:
    with Session(f.api.engine) as s:
        return int(s.exec(select(func.count()).select_from(Reading)).one())


def active(f: Fleet) -> int:
    rows = f.api.client.get("/devices?state=active",
                            headers=f.api.headers(Role.viewer)).json()["data"]
    return len(rows)


def campaign(f: Fleet, cid: int) -> dict[str, object]:
    r = f.api.client.get("/campaigns/%d" % cid, headers=f.api.headers(Role.security))
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_devices_move_to_the_new_intermediate_and_the_old_one_retires(
        fleet: Fleet, pki: TestPKI) -> None:
    f = fleet
    devs = [enroll_fast(f, i + 1)[0] for i in range(N)]
    _broker_trusts_the_ca_directory(f)
    old_id = CertificateAuthority(f.settings.ca_dir).id
    done = rollover(_root_dir(f, pki), f.settings.ca_dir,
                    before_switch=lambda: None if revocation.reload_broker(
                        f.broker.pid_file) else pytest.fail("no broker to reload"))
    loop = DeviceLoop(devs).start()
    runner = None
    try:
        assert wait_for(lambda: active(f) == N, WAIT_S)  # each has streamed: active
        r = f.api.client.post("/campaigns", json={
            "select": "intermediate=%s" % old_id, "wave": 2, "max_failures": "0"},
            headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        assert r.json()["members"] == N
        runner = CampaignRunner(f.api.engine, f.settings,
                                command_key.from_settings(f.settings),
                                wake_publisher=f.publisher.wake,
                                clim=CampaignLimits(runner_every_s=0.2), renew=False).start()
        assert wait_for(lambda: campaign(f, cid)["state"] == "done", 6 * WAIT_S), \
            campaign(f, cid)
        assert wait_for(lambda: all(d.stats.erased == 1 for d in devs), WAIT_S)
    finally:
        if runner is not None:
            runner.stop()
        loop.stop()
    for d in devs:
        assert (d.stats.rotations, d.stats.refused, d.stats.forged) == (1, 0, 0), d.id
    with Session(f.api.engine) as s:
        creds = current_credentials(s)
        assert {creds[d.id].issuer for d in devs} == {done.new_id}
        assert ca_retire.dependents(s, old_id) == []
        # the fleet's own certificates (ingest, control, commands) are still the old
        # intermediate's: retiring it now would lock the fleet out of its broker
        with pytest.raises(RetireRefused) as e:
            ca_retire.retire(s, f.settings.ca_dir, f.settings, by="test")
        assert e.value.devices == [] and len(e.value.services) == 3
        # (their live sessions stay; this test does not re-issue and reconnect them)
        no_services = f.settings.model_copy(update={
            "mqtt_cert_file": None, "broker_control_cert_file": None,
            "commands_cert_file": None})
        assert ca_retire.retire(s, f.settings.ca_dir, no_services, by="test").retired == [
            old_id]
    # the devices connect again with their new certificates; their batches are stored
    before = _stored(f)
    again = [FastDevice(d.dir, "127.0.0.1", f.broker.port, interval_s=0.2) for d in devs]
    loop = DeviceLoop(again).start()
    try:
        assert wait_for(lambda: all(d.stats.published >= 2 for d in again), 2 * WAIT_S), \
            [d.stats for d in again]
        assert wait_for(lambda: _stored(f) > before, WAIT_S)
    finally:
        loop.stop()
    assert all(d.stats.connect_failures == 0 for d in again)
    with Session(f.api.engine) as s:
        assert s.exec(select(func.count()).select_from(Reading).where(
            col(Reading.device_id).in_([d.id for d in devs]))).one() > 0
