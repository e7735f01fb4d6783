"""`cityedge broker config` writes a configuration that runs as Debian runs the broker:
started as root from ``/``, dropping to the ``mosquitto`` user before it reads its
certificates, CRL and plugin file (and again at each SIGHUP, the fleet's CRL reload).

The command checks that the broker's user can reach every file it names; a CA directory
made by `ca init` (0700) and a service key made by `ca issue-service` (0600) are refused
with the change to make, and ``--set-owner`` makes it. ``broker_files`` is tested on its
own with a synthetic user (any machine), the whole path against the real broker as root."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient

from cityedge_fleet import broker_files
from cityedge_fleet.app import create_app
from cityedge_fleet.config import Settings

from support.fleet import Api, enroll_device, wait_for
from support.mosquitto import MOSQUITTO, free_port
from support.procs import stop

pytestmark = pytest.mark.timeout(120)

STRANGER = broker_files.ServiceUser("stranger", 54321, 54321, frozenset({54321}))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder anyone may enter (pytest's own are 0700, which would be the first
    problem found for anybody else)."""
    base = Path(tempfile.mkdtemp(prefix="cityedge-files-", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_what_a_stranger_may_not_read_is_named_with_its_fix(open_dir: Path) -> None:
    tmp_path = open_dir
    ca = tmp_path / "ca"
    ca.mkdir(mode=0o700)
    crl = ca / "crl.pem"
    crl.write_text("crl")
    crl.chmod(0o644)
    key = tmp_path / "broker.key"
    key.write_text("key")
    key.chmod(0o600)
    open_file = tmp_path / "broker.crt"
    open_file.write_text("crt")
    open_file.chmod(0o644)
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    found = broker_files.problems(STRANGER, [crl, key, open_file], [out])
    assert [(p.path, p.need) for p in found] == [(ca, "enter"), (key, "read"),
                                                (out, "write")]
    assert "mode 700" in found[0].why and "chmod g+x %s" % ca in found[0].fix
    assert "mode 600" in found[1].why and "chmod g+r %s" % key in found[1].fix
    assert found[2].fix == "chown stranger %s" % out
    missing = broker_files.problems(STRANGER, [tmp_path / "nope.pem"], [])
    assert [(p.path, p.why) for p in missing] == [(tmp_path / "nope.pem", "does not exist")]
    # the owner's and the group's bits apply to them, not the others' bits
    me = broker_files.ServiceUser("me", os.getuid(), 54321, frozenset({54321}))
    assert broker_files.problems(me, [key], []) == []
    group = broker_files.ServiceUser("g", 54321, os.getgid(), frozenset({os.getgid()}))
    key.chmod(0o640)
    assert broker_files.problems(group, [key], []) == []
    key.chmod(0o604)  # others may read, the group may not: the group's bits decide
    assert [p.path for p in broker_files.problems(group, [key], [])] == [key]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60)


def _uid_of(pid: int) -> int:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # the effective uid
    raise AssertionError("no Uid in /proc/%d/status" % pid)


@pytest.fixture
def etc() -> Iterator[Path]:
    """A folder like /etc/cityedge: open to enter (0755), everything inside as the fleet's
    own commands make it."""
    if os.geteuid() != 0:  # the real path: never a skip
        pytest.fail("the broker-as-a-service test needs root: Debian's service starts the "
                    "broker as root and it drops to its user (CI runs as root)")
    base = Path(tempfile.mkdtemp(prefix="cityedge-etc-", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_the_written_config_runs_as_the_debian_service_does(etc: Path) -> None:
    user = broker_files.lookup("mosquitto")
    assert user is not None, "Debian's mosquitto package makes the user mosquitto"
    ca_dir, svc, out = etc / "ca", etc / "services", etc / "broker"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update(CITYEDGE_MODE="development", CITYEDGE_CA_DIR=str(ca_dir),
               CITYEDGE_DATABASE_URL="sqlite:///%s" % (etc / "fleet.sqlite3"),
               PYTHONPATH=os.pathsep.join(sys.path))
    r = _cli(env, "ca", "init", "--root-dir", str(etc / "root"), "--out-dir", str(ca_dir))
    assert r.returncode == 0, r.stderr
    r = _cli(env, "ca", "issue-service", "--cn", "broker", "--out-dir", str(svc),
             "--server", "localhost", "--server", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    settings = Settings(mode="development", database_url=env["CITYEDGE_DATABASE_URL"],
                        ca_dir=ca_dir, broker_url="mqtts://127.0.0.1:8883",
                        ingest_with_serve=False)
    with TestClient(create_app(settings, init_db=True)) as client:
        dev = enroll_device(Api(client, settings), 1)  # the registry grants it at the broker
    port = free_port()
    state = etc / "broker-state"  # Debian's is /var/lib/mosquitto
    args = ["broker", "config", "--out-dir", str(out), "--certfile", str(svc / "broker.crt"),
            "--keyfile", str(svc / "broker.key"), "--port", str(port), "--bind", "127.0.0.1",
            "--persistence-dir", str(state)]

    # as the fleet made them, the broker's user cannot enter the CA folder (0700) nor read
    # the key (0600): the command says so, naming each and the change to make
    r = _cli(env, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot enter %s" % ca_dir in r.stderr and "read %s" % (svc / "broker.key") \
        in r.stderr
    assert "chmod g+x %s" % ca_dir in r.stderr and "--set-owner" in r.stderr
    assert "Traceback" not in r.stderr
    # ... and it is right: started as the service starts it, the broker does not come up
    failed = subprocess.Popen([MOSQUITTO, "-c", str(out / "mosquitto.conf")], cwd="/",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        code = failed.wait(30)
    finally:
        stop(failed)
    assert code != 0

    r = _cli(env, *args, "--set-owner")
    assert r.returncode == 0, r.stderr
    assert "chgrp mosquitto %s && chmod g+x %s" % (ca_dir, ca_dir) in r.stderr
    key_mode = stat.S_IMODE((svc / "broker.key").stat().st_mode)
    assert key_mode == 0o640  # the group may read it, nobody else
    assert stat.S_IMODE((ca_dir / "intermediate.key").stat().st_mode) == 0o600
    conf = Path(r.stdout.strip())
    assert "user mosquitto" in conf.read_text()
    assert "persistence_location %s/" % state in conf.read_text()
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], cwd="/",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        files = etc / "device"
        files.mkdir()
        (files / "chain.pem").write_text(str(dev.enrollment["chain_pem"]))
        (files / "ca.pem").write_text(str(dev.enrollment["ca_bundle_pem"]))
        (files / "key.pem").write_bytes(dev.signer.private_pem())

        def publish_once() -> bool:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev.id,
                            protocol=mqtt.MQTTv5)
            c.tls_set(ca_certs=str(files / "ca.pem"), certfile=str(files / "chain.pem"),
                      keyfile=str(files / "key.pem"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            try:
                c.connect("127.0.0.1", port)
            except OSError:
                return False
            c.loop_start()
            try:
                info = c.publish(dev.topic, dev.sign(1), qos=1)
                info.wait_for_publish(5)
                return info.is_published()
            except (RuntimeError, ValueError):
                return False
            finally:
                c.disconnect()
                c.loop_stop()

        assert wait_for(publish_once, timeout=30), broker.stderr
        assert _uid_of(broker.pid) == user.uid  # it runs as mosquitto, not as root
        # the CRL reload (SIGHUP) reads the files again, as mosquitto: still serving
        broker.send_signal(signal.SIGHUP)
        assert wait_for(publish_once, timeout=30)
        assert broker.poll() is None
    finally:
        stop(broker)
    # a graceful stop saved its state where the config says, as its own user
    assert (state / "mosquitto.db").is_file()
    assert (state / "mosquitto.db").stat().st_uid == user.uid
