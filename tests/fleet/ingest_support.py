"""Helpers for the ingest tests: an enrolled device with its own key, signing batches."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine

from cityedge_core import batch as batchmod
from cityedge_core import senml
from cityedge_fleet.models import Role
from cityedge_host.crypto import EcSigner

from .conftest import Api, device_body


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
