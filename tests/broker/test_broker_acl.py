"""The real broker enforces what the design relies on: mTLS, identity = CN, ACL by %u, CRL."""

from __future__ import annotations

import ssl
import subprocess
import time

import paho.mqtt.client as mqtt

from support.mosquitto import Mosquitto, TestPKI

DEVICE = "urn:dev:mac:0024befffe804ff1"
OTHER = "urn:dev:mac:0024befffe804ff2"


def _client(broker: Mosquitto, cert: object, key: object, ca: object) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key),
              tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return c


def _sub(broker: Mosquitto, pki: TestPKI, topic: str, count: int, timeout: float = 5
         ) -> subprocess.Popen[bytes]:
    svc = pki.issue_client("fleet-ingest")
    p = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(pki.ca_pem),
         "--cert", str(svc.cert_pem), "--key", str(svc.key_pem), "-t", topic, "-C", str(count),
         "-W", str(int(timeout)), "-v", "-q", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    return p


def _publish(broker: Mosquitto, pki: TestPKI, creds: object, topic: str) -> int:
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(pki.ca_pem),
         "--cert", str(creds.cert_pem), "--key", str(creds.key_pem),  # type: ignore[attr-defined]
         "-t", topic, "-m", "x", "-q", "1"],
        capture_output=True, timeout=10).returncode


def test_device_publishes_own_topic_only(mosquitto: Mosquitto, pki: TestPKI) -> None:
    dev = pki.issue_client(DEVICE)
    sub = _sub(mosquitto, pki, "ce/v1/+/up/#", 1, timeout=4)
    assert _publish(mosquitto, pki, dev, "ce/v1/%s/up/readings" % OTHER) == 0  # silently dropped
    assert _publish(mosquitto, pki, dev, "ce/v1/%s/up/readings" % DEVICE) == 0
    out, _ = sub.communicate(timeout=10)
    lines = out.decode().splitlines()
    assert lines == ["ce/v1/%s/up/readings x" % DEVICE]


def test_certificate_from_another_ca_is_refused(mosquitto: Mosquitto, pki: TestPKI,
                                                tmp_path: object) -> None:
    from pathlib import Path
    rogue = TestPKI(Path(str(tmp_path)) / "rogue", ca_name="rogue CA")
    creds = rogue.issue_client(DEVICE)
    assert _publish(mosquitto, pki, creds, "ce/v1/%s/up/readings" % DEVICE) != 0


def test_revoked_certificate_refused_after_reload(pki: TestPKI) -> None:
    dev = pki.issue_client(OTHER)
    broker = Mosquitto(pki, crl=True).start()
    try:
        assert _publish(broker, pki, dev, "ce/v1/%s/up/readings" % OTHER) == 0
        pki.revoke(dev)
        pki.write_crl(broker.crl_path)
        broker.reload()
        assert _publish(broker, pki, dev, "ce/v1/%s/up/readings" % OTHER) != 0
    finally:
        pki.revoked.clear()
        broker.cleanup()


def test_plain_connection_without_certificate_refused(mosquitto: Mosquitto) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    try:
        c.connect("127.0.0.1", mosquitto.port, keepalive=5)
        c.loop_start()
        time.sleep(1.0)
        connected = c.is_connected()
    except OSError:
        connected = False
    finally:
        c.loop_stop()
    assert not connected
