"""``cityedge gateway run`` as a user runs it: a subprocess with a config file, an SDS011
on a pty, a real TLS Mosquitto, /metrics on localhost; and its refusals at start."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tty
import urllib.request
from pathlib import Path

import aiomqtt

from cityedge_core import cbor, chain, cose
from cityedge_gateway import sds011
from cityedge_host.crypto import EcSigner

from support.monitoring import names_offered, names_used
from support.mosquitto import OBSERVER, Mosquitto, TestPKI, free_port

GW = "urn:dev:mac:b827ebfffe123456"
CLI = [sys.executable, "-m", "cityedge.cli", "gateway", "run", "--config"]


def _config(tmp_path: Path, key: Path, broker: str = "", metrics: int = 0, tty: str = "") -> Path:
    text = """
[gateway]
device = "%s"
key_file = "%s"
batch_readings = 10
batch_max_age_s = 0.5

[store]
path = "buffer.sqlite"
budget_bytes = 10_000_000

[metrics]
port = %d
%s
""" % (GW, key, metrics, broker)
    if tty:
        text += '\n[[serial]]\nname = "pm"\nport = "%s"\nprotocol = "sds011"\n' % tty
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


def test_refuses_bad_config_and_readable_key(tmp_path: Path) -> None:
    key = tmp_path / "gw.key"
    EcSigner.generate().save(key)
    bad = _config(tmp_path, key).read_text().replace("batch_readings = 10", "batch_readings = 0")
    (tmp_path / "bad.toml").write_text(bad)
    r = subprocess.run([*CLI, str(tmp_path / "bad.toml")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("cityedge: ") and "gateway.batch_readings" in r.stderr
    assert "Traceback" not in r.stderr
    key.chmod(0o644)
    r = subprocess.run([*CLI, str(_config(tmp_path, key))], capture_output=True, text=True)
    assert r.returncode == 1
    assert "mode 644" in r.stderr and "chmod 600" in r.stderr and "Traceback" not in r.stderr
    assert "PRIVATE KEY" not in r.stderr + r.stdout


def test_gateway_run_end_to_end(tmp_path: Path, pki: TestPKI, mosquitto: Mosquitto) -> None:
    signer = EcSigner.generate()
    key = tmp_path / "gw.key"
    signer.save(key)
    creds = pki.issue_client(GW)
    mosquitto.grant(GW)
    creds.key_pem.chmod(0o600)
    broker = """
[broker]
host = "127.0.0.1"
port = %d
ca_file = "%s"
cert_file = "%s"
key_file = "%s"
keepalive_s = 5
""" % (mosquitto.port, pki.ca_pem, creds.cert_pem, creds.key_pem)
    master, slave = os.openpty()
    tty.setraw(master)
    link = tmp_path / "ttyUSB0"
    link.symlink_to(os.ttyname(slave))
    metrics_port = free_port()
    cfg = _config(tmp_path, key, broker, metrics_port, str(link))
    sub_creds = pki.service(OBSERVER)
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    ctx.load_cert_chain(str(sub_creds.cert_pem), str(sub_creds.key_pem))
    got: dict[str, list[bytes]] = {"readings": [], "status": []}
    metrics = ""

    async def scenario() -> subprocess.Popen[bytes]:
        nonlocal metrics
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, tls_context=ctx) as c:
            await c.subscribe("ce/v1/%s/up/#" % GW, qos=1)
            proc = subprocess.Popen([*CLI, str(cfg)], stderr=subprocess.PIPE)
            try:
                async with asyncio.timeout(20):
                    async for msg in c.messages:  # a status says the serial port is open
                        got[str(msg.topic).rsplit("/", 1)[1]].append(bytes(msg.payload))  # type: ignore[arg-type]
                        break
                for i in range(30):  # pyserial flushed what came before it opened the port
                    os.write(master, sds011.encode_frame(100 + i, 200 + i))
                os.write(master, b"\x00\x01\x02")  # garbage at the end
                async with asyncio.timeout(20):
                    async for msg in c.messages:
                        got[str(msg.topic).rsplit("/", 1)[1]].append(bytes(msg.payload))  # type: ignore[arg-type]
                        if len(got["readings"]) >= 6:
                            break
                url = "http://127.0.0.1:%d/metrics" % metrics_port
                metrics = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(url).read().decode()
                )
            except BaseException:
                proc.kill()
                _, err = proc.communicate()
                print(err.decode(), got)
                raise
            return proc

    proc = asyncio.run(scenario())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    os.close(master)
    os.close(slave)
    assert proc.returncode == 0, err.decode()
    v = chain.BatchVerifier({signer.kid: chain.KeyEntry(GW, signer.verifier())})
    verdicts = [v.check(p) for p in got["readings"]]
    assert [x.status for x in verdicts] == ["ok"] * len(verdicts)
    values = [r[2] for x in verdicts for r in x.batch.records]
    assert values[:4] == [10.0, 20.0, 10.1, 20.1]  # pm25, pm10 of the first two frames
    assert len(values) == 60
    status = cose.decode_sign1(got["status"][0])
    status.verify(signer.verifier())
    body = cbor.loads(status.payload)
    assert body["device"] == GW and "pm" in body["inputs"]
    assert body["inputs"]["pm"]["connected"] is True
    assert 'cityedge_gateway_serial_readings_total{input="pm"} 60.0' in metrics
    assert 'cityedge_gateway_serial_errors_total{input="pm",kind="garbage"} 1.0' in metrics
    assert "cityedge_gateway_mqtt_connected 1.0" in metrics
    # the client library's own collectors and the build info come with it
    assert "\nprocess_cpu_seconds_total " in metrics and "python_info{" in metrics
    assert 'cityedge_gateway_build_info{device="%s",version="' % GW in metrics
    # every gateway name the deployed alert rules and dashboards use is served
    used = names_used("cityedge_gateway_")
    assert len(used) >= 8 and not used - names_offered(metrics), used - names_offered(metrics)
    assert b"PRIVATE KEY" not in err
