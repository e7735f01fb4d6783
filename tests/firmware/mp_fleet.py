"""A MicroPython agent beside the real fleet: the helpers the firmware tests that wire the
unix-port agent to ``support.fastfleet.real_fleet`` share (the rotation, the trust update,
the 1,000-device campaign), and the stand-in command publisher of the tests without a
fleet. Test modules import these from here, never from each other."""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives import serialization
from fw_harness import device_config
from sqlmodel import Session, col, func, select

from cityedge_fleet.models import ChainStateRow, Reading

from support.fastfleet import Fleet, enroll_through_api, keep_first
from support.mosquitto import Mosquitto, TestPKI

# The rotation's heap: the agent only keeps each command and resets; its heavy steps (the
# rotation's modules and their ~86 names, the key generation, the CSR and proof, the
# switch's TLS context) run at boot before the agent exists, and the switch is a normal
# boot. Measured: see docs/ARCHITECTURE.md, "Memory on the device" (112k before, when the
# rotation ran beside the streaming agent). ``CE_ROTATION_HEAP`` overrides it.
# 72k passed in every run but one (a whole-suite CI run, 3 workers on 2 cores: the CSR and
# answer a boot signed were never published, `<state>.unpublished` left on the flash; the
# cause is not found), so the tests run at 80k until it is.
ROTATION_HEAP = os.environ.get("CE_ROTATION_HEAP", "80k")
RESEND_S = 3600.0  # the fleet's resend: never within a test


def pem_to_der(pem: str) -> bytes:
    body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    return base64.b64decode("".join(body.split()))


def enroll_mp(f: Fleet, i: int, tmp: Path) -> SimpleNamespace:
    """Register and enroll device ``i`` through the API (``enroll_through_api``) and lay
    out its flash files as provisioning does (key.der, cert.der = the leaf, the fleet's
    command keys); also keeps its first key and chain as PEM (``first``: ``keep_first``),
    to try them once revoked."""
    body, signer, enrolled = enroll_through_api(f, i)
    files = tmp / "files"
    files.mkdir()
    key = serialization.load_pem_private_key(signer.private_pem(), password=None)
    (files / "key.der").write_bytes(key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (files / "cert.der").write_bytes(pem_to_der(enrolled["chain_pem"]))
    keys = []
    for n, hexkey in enumerate(enrolled["fleet_keys"]):
        (files / ("fleet%d.pub" % n)).write_bytes(bytes.fromhex(hexkey))
        keys.append(str(files / ("fleet%d.pub" % n)))
    first = keep_first(tmp, signer, enrolled["chain_pem"])
    return SimpleNamespace(id=str(body["id"]), signer=signer, files=files, first=first,
                           fleet_keys=tuple(keys),
                           creds=SimpleNamespace(cert_der=files / "cert.der",
                                                 key_der=files / "key.der"))


def mp_config(f: Fleet, dev: SimpleNamespace, tmp: Path, stop: dict[str, Any]) -> Path:
    return device_config(tmp, f.broker, f.pki, dev.creds, stop, dev.id, clock=True,
                         fleet_keys=dev.fleet_keys, batch_readings=4, time_scale=5,
                         status_interval_s=86400)


def stored(f: Fleet, device: str) -> tuple[int, int, int]:
    """(distinct batches with readings, last seq on the chain, gaps still missing)."""
    with Session(f.api.engine) as s:
        batches = s.exec(select(func.count(func.distinct(Reading.batch_seq))).where(
            col(Reading.device_id) == device)).one()
        row = s.get(ChainStateRow, device)
        return int(batches), (row.last_seq if row else 0), (row.missing if row else 0)


def fleet_publisher(broker: Mosquitto, pki: TestPKI) -> paho.Client:
    creds = pki.issue_client("fleet-commands")
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="commands-test",
                    protocol=paho.MQTTv311)
    c.tls_set(ca_certs=str(pki.ca_pem), certfile=str(creds.cert_pem),
              keyfile=str(creds.key_pem), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c
