"""What the fleet tests share: an API client with a token per role, enrolled devices that
sign batches, poison batches, and the small fakes of pure-logic tests.

``Api`` wraps a ``TestClient`` of the real app; ``enroll_device`` registers and enrolls a
device through the API with a key of its own; ``POISON`` holds validly signable SenML a
database could not store (the ingest must refuse it as malformed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message
from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_core import batch as batchmod
from cityedge_core import limits, senml
from cityedge_fleet.auth import create_api_token
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Role
from cityedge_host.crypto import EcSigner


class Api:
    """A TestClient plus tokens for each role."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.engine = client.app.state.engine  # type: ignore[attr-defined]
        self._tokens: dict[Role, str] = {}

    def token(self, role: Role) -> str:
        if role not in self._tokens:
            with Session(self.engine) as session:
                _, tok = create_api_token(session, name="test-%s" % role.value, role=role,
                                          created_by="test")
                session.commit()
            self._tokens[role] = tok
        return self._tokens[role]

    def headers(self, role: Role) -> dict[str, str]:
        return {"Authorization": "Bearer %s" % self.token(role)}


DEVICE = "urn:dev:mac:0024befffe804ff1"


def device_body(i: int = 1, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "urn:dev:mac:0024befffe80%04x" % i, "serial": "SN-%05d" % i,
        "model": "ce-air-1", "hardware_class": "esp32", "site": "harbour", "tags": ["air"],
    }
    body.update(extra)
    return body


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def make_csr(cn: str = DEVICE, key: object = None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


@dataclass
class FakeMessage:
    mid: int
    topic: str = "ce/v1/urn:dev:mac:01/up/readings"
    payload: bytes = b"x"
    qos: int = 1


def relay_topic(gateway: str) -> str:
    return "ce/v1/%s/up/relay" % gateway


T0 = 1_790_000_000.0
HUGE = 1.7976931348623157e308
NAME = limits.DEVICE_ID_MAX_CHARS  # characters of a bn or n
UNIT = limits.SENML_NAME_MAX_CHARS  # characters of a unit

POISON: dict[str, list[dict[int, Any]]] = {
    "bignum": [{senml.BT: T0, senml.N: "x", senml.V: 2**70}],
    "negative-bignum": [{senml.BT: T0, senml.N: "x", senml.V: -(2**70)}],
    "uint64-over-int64": [{senml.BT: T0, senml.N: "x", senml.V: 2**63}],
    "bignum-time": [{senml.BT: 2**64 + 5, senml.N: "x", senml.V: 1}],
    "name-over-column": [{senml.BN: "b" * NAME, senml.BT: T0, senml.N: "n" * (UNIT + 1),
                          senml.V: 1}],
    "n-over-cap": [{senml.BT: T0, senml.N: "n" * (NAME + 1), senml.V: 1}],
    "unit-over-column": [{senml.BT: T0, senml.N: "x", senml.U: "u" * (UNIT + 1), senml.V: 1}],
    "base-unit-over-column": [{senml.BT: T0, senml.BU: "u" * (UNIT + 1), senml.N: "x",
                               senml.V: 1}],
    "nul-in-vs": [{senml.BT: T0, senml.N: "x", senml.VS: "a\x00b"}],
    "escape-in-vs": [{senml.BT: T0, senml.N: "x", senml.VS: "\x1b[2J"}],
    "newline-in-vs": [{senml.BT: T0, senml.N: "x", senml.VS: "a\nb"}],
    "nul-in-unit": [{senml.BT: T0, senml.N: "x", senml.U: "C\x00", senml.V: 1}],
    "del-in-unit": [{senml.BT: T0, senml.N: "x", senml.U: "C\x7f", senml.V: 1}],
    "nan": [{senml.BT: T0, senml.N: "x", senml.V: float("nan")}],
    "+inf": [{senml.BT: T0, senml.N: "x", senml.V: float("inf")}],
    "-inf": [{senml.BT: T0, senml.N: "x", senml.V: float("-inf")}],
    "nan-sum": [{senml.BT: T0, senml.N: "x", senml.S: float("nan")}],
    "inf-time": [{senml.BT: float("inf"), senml.N: "x", senml.V: 1}],
    "value-overflow": [{senml.BT: T0, senml.N: "x", senml.BV: HUGE, senml.V: HUGE}],
    "sum-overflow": [{senml.BT: T0, senml.N: "x", senml.BS: -HUGE, senml.S: -HUGE}],
    "time-overflow": [{senml.BT: HUGE, senml.N: "x", senml.T: HUGE, senml.V: 1}],
}


def forgery(kid: bytes, device: str, seq: int) -> bytes:
    """A well-formed batch for ``device`` with its kid, signed by somebody else's key."""
    payload = batchmod.Batch(device, seq, bytes(32), 1, records(2)).encode()
    msg = Sign1Message(phdr={Algorithm: Es256, KID: kid}, payload=payload)
    msg.key = EC2Key.generate_key(crv=P256)
    return bytes(msg.encode())


@dataclass
class EnrolledDevice:
    id: str
    signer: EcSigner
    writer: batchmod.BatchWriter
    enrollment: dict[str, object]

    @property
    def topic(self) -> str:
        return "ce/v1/%s/up/readings" % self.id

    def sign(self, n: int = 3, t0: float = 1_790_000_000.0) -> bytes:
        return self.writer.sign(records(n, t0), boot=1)


def records(n: int, t0: float = 1_790_000_000.0) -> list[dict[int, object]]:
    recs: list[dict[int, object]] = [{senml.BN: "pm25-", senml.BT: t0, senml.BU: "ug/m3",
                                      senml.N: "0", senml.V: 1.5}]
    for i in range(1, n):
        recs.append({senml.N: str(i), senml.T: float(i), senml.V: 1.5 + i})
    return recs


def csr_for(signer: EcSigner, cn: str) -> str:
    key = serialization.load_pem_private_key(signer.private_pem(), password=None)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def enroll_device(api: Api, i: int, signer: EcSigner | None = None,
                  gateway: str | None = None) -> EnrolledDevice:
    """Register device ``i`` (a node of ``gateway`` if given) and enroll it (token + CSR)
    with ``signer``'s key (a new one by default)."""
    body = device_body(i) if gateway is None else device_body(i, gateway_id=gateway)
    tech = api.headers(Role.technician)
    assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                            headers=tech).json()["token"]
    signer = signer or EcSigner.generate()
    r = api.client.post("/enroll", json={"serial": body["serial"], "token": token,
                                         "csr_pem": csr_for(signer, str(body["id"]))})
    assert r.status_code == 200, r.text
    dev_id = str(body["id"])
    return EnrolledDevice(dev_id, signer, batchmod.BatchWriter(dev_id, signer, signer.kid),
                          r.json())


def set_gateway(api: Api, node: str, gateway: str | None) -> None:
    """Register ``node`` as reporting through ``gateway`` (None: through none)."""
    r = api.client.patch("/devices/%s" % node, json={"gateway_id": gateway},
                         headers=api.headers(Role.technician))
    assert r.status_code == 200, r.text


def refuse_rows(engine: Engine, table: str, when: str, refuse: bool = True) -> None:
    """A trigger that makes the database refuse a new ``table`` row for which the SQL
    condition ``when`` holds (``NEW.<column>`` names the row): a real failure of one
    specific row, on SQLite and PostgreSQL. ``refuse=False`` removes it."""
    name = "refuse_" + table
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            if refuse:
                c.exec_driver_sql(
                    "CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF %s THEN RAISE EXCEPTION 'refused by the test'; END IF; "
                    "RETURN NEW; END $$" % (name, when))
                c.exec_driver_sql("CREATE TRIGGER %s BEFORE INSERT ON %s FOR EACH ROW "
                                  "EXECUTE FUNCTION %s()" % (name, table, name))
            else:
                c.exec_driver_sql("DROP TRIGGER %s ON %s" % (name, table))
                c.exec_driver_sql("DROP FUNCTION %s()" % name)
        elif refuse:
            c.exec_driver_sql("CREATE TRIGGER %s BEFORE INSERT ON %s WHEN %s BEGIN "
                              "SELECT RAISE(ABORT, 'refused by the test'); END"
                              % (name, table, when))
        else:
            c.exec_driver_sql("DROP TRIGGER %s" % name)


def offline_worker(settings: Settings, tmp_path: Path, *, limits: Any = None,
                   engine: Engine | None = None, ingestor: Any = None
                   ) -> tuple[Any, list[int]]:
    """An ``MqttIngestWorker`` that is never connected: messages are handed to it as the
    broker would (``_on_message``) and its acknowledgements are recorded (mids, in order)
    instead of sent. ``settings`` gets a throwaway ingest certificate and ``limits``; the
    worker runs ``ingestor``, or a real ``Ingestor`` on ``engine`` with those settings."""
    from cityedge_fleet.ingest import Ingestor
    from cityedge_fleet.ingest_mqtt import MqttIngestWorker

    from support.mosquitto import TestPKI

    pki = TestPKI(tmp_path / "pki")
    creds = pki.issue_client("fleet-ingest")
    update: dict[str, Any] = {"mqtt_ca_file": pki.ca_pem, "mqtt_cert_file": creds.cert_pem,
                              "mqtt_key_file": creds.key_pem}
    if limits is not None:
        update["limits"] = limits
    settings = settings.model_copy(update=update)
    if ingestor is None:
        assert engine is not None, "give an ingestor or an engine"
        ingestor = Ingestor(engine, settings)
    worker = MqttIngestWorker(ingestor, settings)
    acks: list[int] = []
    worker.client.ack = lambda mid, qos: acks.append(mid)
    return worker, acks
