"""End to end on a real Mosquitto configured by `cityedge broker config`: a device enrolled
through the API connects with its new certificate, its signed readings arrive through the
MQTT 5 shared-subscription ingest and appear verified in the readings API (also when
the device registered as its gateway relays them); after the
security team revokes its certificate the broker (SIGHUP, CRL) refuses it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient

from cityedge_fleet.app import create_app
from cityedge_fleet.ca import INTERMEDIATE_CERT, INTERMEDIATE_KEY
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker
from cityedge_fleet.models import Role

from support.fleet import Api, EnrolledDevice, enroll_device, set_gateway, wait_for
from support.mosquitto import MOSQUITTO, free_port
from support.procs import stop

pytestmark = pytest.mark.timeout(120)


def _issue(ca_dir: Path, out: Path, cn: str, server: bool) -> tuple[Path, Path]:
    """A broker or service certificate from the intermediate (the operator's job)."""
    ca_key = serialization.load_pem_private_key((ca_dir / INTERMEDIATE_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / INTERMEDIATE_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    crt, pem = out / (cn + ".crt"), out / (cn + ".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM) +
                    ca_cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    crt.chmod(0o644)
    pem.chmod(0o644)  # a throwaway test key, readable by the mosquitto user
    return crt, pem


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _device_files(directory: Path, dev: EnrolledDevice) -> Path:
    """What a provisioning tool writes to the device from the enrollment response."""
    directory.mkdir()
    (directory / "chain.pem").write_text(str(dev.enrollment["chain_pem"]))
    (directory / "ca.pem").write_text(str(dev.enrollment["ca_bundle_pem"]))
    (directory / "key.pem").write_bytes(dev.signer.private_pem())
    return directory


@pytest.fixture
def world(ca_dirs: tuple[Path, Path]) -> Iterator[Path]:
    """A directory the mosquitto user can read (it drops root privileges)."""
    base = Path(tempfile.mkdtemp(prefix="cityedge-fleet-e2e-"))
    base.chmod(0o755)
    shutil.copytree(ca_dirs[1], base / "ca")
    (base / "ca").chmod(0o755)  # the broker reads crl.pem; the key stays 0600
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_enrolled_device_reaches_readings_api_and_revocation_locks_it_out(
        world: Path) -> None:
    port = free_port()
    ca_dir = world / "ca"
    broker_dir = world / "broker"
    broker_dir.mkdir()
    broker_dir.chmod(0o777)  # mosquitto writes its log here as its own user
    server_crt, server_key = _issue(ca_dir, broker_dir, "localhost", server=True)
    ingest_crt, ingest_key = _issue(ca_dir, world, "fleet-ingest", server=False)
    # a second worker is a second identity: one CN is one client id at the broker
    ingest2_crt, ingest2_key = _issue(ca_dir, world, "fleet-ingest-2", server=False)
    control_crt, control_key = _issue(ca_dir, world, "fleet-control", server=False)
    env = dict(os.environ, CITYEDGE_MODE="development", CITYEDGE_CA_DIR=str(ca_dir),
               CITYEDGE_DATABASE_URL="sqlite:///%s" % (world / "fleet.sqlite3"))
    init = subprocess.run([sys.executable, "-m", "cityedge.cli", "fleet", "init-db"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr  # the operator's first step: nothing else creates
    r = subprocess.run([sys.executable, "-m", "cityedge.cli", "broker", "config", "--out-dir",
                        str(broker_dir), "--certfile", str(server_crt), "--keyfile",
                        str(server_key), "--port", str(port), "--bind", "127.0.0.1",
                        "--service", "fleet-ingest", "--service", "fleet-ingest-2",
                        "--service", "fleet-control"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    conf = Path(r.stdout.strip())
    assert "crlfile %s" % (ca_dir / "crl.pem") in conf.read_text()
    log = broker_dir / "mosquitto.log"
    with conf.open("a") as f:
        f.write("log_dest file %s\nlog_type all\n" % log)
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    pid_file = world / "mosquitto.pid"
    pid_file.write_text(str(broker.pid))
    settings = Settings(mode="development", database_url=env["CITYEDGE_DATABASE_URL"],
                        ca_dir=ca_dir,
                        broker_url="mqtts://127.0.0.1:%d" % port, broker_pid_file=pid_file,
                        mqtt_port=port, mqtt_ca_file=ca_dir / "root.crt",
                        mqtt_cert_file=ingest_crt, mqtt_key_file=ingest_key,
                        broker_control_cert_file=control_crt,
                        broker_control_key_file=control_key, ingest_with_serve=False,
                        ingest_subscription="shared")  # two workers share the stream
    app = create_app(settings, init_db=True)
    assert wait_for(lambda: _listening(port), timeout=20), "mosquitto did not start"
    worker = None
    cli_worker: subprocess.Popen[bytes] | None = None
    try:
        with TestClient(app) as client:
            api = Api(client, settings)
            dev = enroll_device(api, 1)
            other = enroll_device(api, 2)
            set_gateway(api, dev.id, other.id)  # dev is a node that reports through other
            worker = MqttIngestWorker(Ingestor(app.state.engine, settings), settings).start()
            assert worker.subscribed.wait(10), log.read_text() if log.exists() else ""
            # a second worker, the CLI one, shares the subscription
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's place
            notify.bind(str(world / "notify.sock"))
            notify.settimeout(30)
            ingest_env = dict(env, CITYEDGE_MQTT_PORT=str(port),
                              CITYEDGE_MQTT_CA_FILE=str(ca_dir / "root.crt"),
                              CITYEDGE_MQTT_CERT_FILE=str(ingest2_crt),
                              CITYEDGE_MQTT_KEY_FILE=str(ingest2_key),
                              NOTIFY_SOCKET=str(world / "notify.sock"),
                              WATCHDOG_USEC="400000", CITYEDGE_INGEST_SUBSCRIPTION="shared")
            cli_worker = subprocess.Popen(
                [sys.executable, "-m", "cityedge.cli", "fleet", "ingest"], env=ingest_env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert wait_for(lambda: "fleet-ingest-2 1 $share/%s/" % settings.ingest_share_group
                            in log.read_text(),
                            timeout=20), log.read_text()
            # Type=notify: READY once its subscriptions are granted, then the pings of
            # its storing thread
            assert notify.recv(4096).decode().startswith(
                "READY=1\nSTATUS=ingest ")
            assert notify.recv(4096) == b"WATCHDOG=1"
            notify.close()
            files = _device_files(world / "device", dev)
            other_files = _device_files(world / "other", other)
            assert str(dev.enrollment["broker_url"]).endswith(":%d" % port)

            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev1",
                            protocol=mqtt.MQTTv5)
            c.tls_set(ca_certs=str(files / "ca.pem"), certfile=str(files / "chain.pem"),
                      keyfile=str(files / "key.pem"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            c.connect("127.0.0.1", port)
            c.loop_start()
            for _ in range(10):
                c.publish(dev.topic, dev.sign(5), qos=1).wait_for_publish(5)
            c.disconnect()
            c.loop_stop()
            viewer = api.headers(Role.viewer)

            def readings() -> int:
                return len(client.get("/devices/%s/readings" % dev.id,
                                      headers=viewer).json())

            assert wait_for(lambda: readings() == 50), readings()
            # /metrics counts the verdicts of the process's worker (as `fleet serve`
            # wires it: app.state.ingest_worker)
            app.state.ingest_worker = worker
            scraped = client.get("/metrics", headers=api.headers(Role.monitor)).text
            ok = [line for line in scraped.splitlines()
                  if line.startswith('cityedge_fleet_ingest_batches_total{verdict="ok"}')]
            assert ok and float(ok[0].split()[-1]) == worker.ingestor.counts["ok"]
            got = client.get("/devices/%s" % dev.id, headers=viewer).json()
            assert got["state"] == "active" and got["chain"]["last_seq"] == 10

            # the broker shared the batches between the two workers
            mine = sum(worker.ingestor.counts.values())
            assert 0 < mine < 10, worker.ingestor.counts

            # the other device, dev's registered gateway, relays dev's next batch unchanged
            g = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gw",
                            protocol=mqtt.MQTTv5)
            g.tls_set(ca_certs=str(other_files / "ca.pem"),
                      certfile=str(other_files / "chain.pem"),
                      keyfile=str(other_files / "key.pem"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            g.connect("127.0.0.1", port)
            g.loop_start()
            g.publish("ce/v1/%s/up/relay" % other.id, dev.sign(5), qos=1).wait_for_publish(5)
            g.disconnect()
            g.loop_stop()
            assert wait_for(lambda: readings() == 55), readings()
            relayed = [r for r in client.get("/devices/%s/readings" % dev.id, headers=viewer,
                                             params={"limit": 500}).json() if r["via"]]
            assert {(r["batch_seq"], r["via"]) for r in relayed} == {(11, other.id)}

            def can_publish(files: Path, topic: str) -> bool:
                p = subprocess.run(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile",
                     str(files / "ca.pem"), "--cert", str(files / "chain.pem"), "--key",
                     str(files / "key.pem"), "-t", topic, "-m", "x", "-q", "1"],
                    capture_output=True, timeout=20)
                return p.returncode == 0

            assert can_publish(files, dev.topic)  # before revocation

            # revoke: CRL re-signed, broker SIGHUPed, the device is refused at TLS
            sec = api.headers(Role.security)
            serial = client.get("/devices/%s/credentials" % dev.id,
                                headers=sec).json()[0]["serial"]
            assert client.post("/devices/%s/credentials/%s/revoke" % (dev.id, serial),
                               headers=sec).status_code == 200

            assert wait_for(lambda: not can_publish(files, dev.topic), timeout=10)
            assert broker.poll() is None  # refused by the CRL, not by a dead broker
            assert can_publish(other_files, other.topic)  # the others still get in
    finally:
        if worker is not None:
            worker.stop()
        if cli_worker is not None:
            cli_worker.terminate()
            cli_worker.wait(10)
        stop(broker, 5)
        app.state.engine.dispose()
