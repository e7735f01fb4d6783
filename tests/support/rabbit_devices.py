"""Devices against the RabbitMQ cluster in tests: enrolled through the fleet's API as a
technician and the device do it (``enroll``), and a bare MQTT 3.1.1 client that records
what the broker let it do (``MqttTry``)."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cityedge.fastdevice import provision
from cityedge_fleet.models import Role
from cityedge_host.crypto import EcSigner

from support.fleet import Api, csr_for, device_body
from support.mosquitto import TestPKI


def enroll(api: Api, world: Path, pki: TestPKI, i: int) -> tuple[str, Path]:
    body = device_body(i)
    tech = api.headers(Role.technician)
    assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                            headers=tech).json()["token"]
    signer = EcSigner.generate()
    r = api.client.post("/enroll", json={"serial": body["serial"], "token": token,
                                         "csr_pem": csr_for(signer, str(body["id"]))})
    assert r.status_code == 200, r.text
    enrolled = r.json()
    d = world / ("dev%d" % i)
    provision(d, device_id=str(body["id"]), signer=signer, chain_pem=enrolled["chain_pem"],
              ca_pem=pki.ca_pem.read_text(), fleet_keys=enrolled["fleet_keys"])
    (d / "key.pem").write_bytes(signer.private_pem())
    (d / "chain.pem").write_text(enrolled["chain_pem"])
    return str(body["id"]), d



class MqttTry:
    """One MQTT 3.1.1 client over TLS with a certificate: what the broker let it do."""

    def __init__(self, port: int, cert: Path, key: Path, ca: Path, client_id: str,
                 username: str | None = None, password: str | None = None) -> None:
        self.connack: int | None = None
        self.granted: list[int] = []
        self.acked: list[int] = []
        self.gone = threading.Event()
        self.subacked = threading.Event()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311)
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        self.client.tls_set_context(ctx)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.gone.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = lambda _c, _u, mid, *_a: self.acked.append(mid)
        try:
            self.client.connect("127.0.0.1", port, keepalive=10)
        except (ssl.SSLError, OSError):
            self.gone.set()
            return
        self.client.loop_start()
        threading.Event().wait(0)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason.value
        if not reason.is_failure:
            self.connected.set()
        else:
            self.gone.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        self.granted = [r.value for r in reasons]
        self.subacked.set()

    def wait_connected(self) -> bool:
        for _ in range(200):
            if self.connected.is_set() or self.gone.is_set():
                break
            self.gone.wait(0.05)
        return self.connected.is_set() and not self.gone.is_set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


