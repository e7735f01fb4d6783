"""What the key rotation tests share: a device's side of the protocol in a few lines (the
core's ``rotation`` with host keys), and looks at a rotation's rows."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from cityedge_core import cbor, cose, rotation, topics
from cityedge_fleet.models import AuditRecord, FleetCommand, KeyRotation
from cityedge_host.crypto import EcSigner

from support.fleet import csr_for


def csr_der(signer: EcSigner, cn: str) -> bytes:
    return x509.load_pem_x509_csr(csr_for(signer, cn).encode()).public_bytes(
        serialization.Encoding.DER)


def csr_topic(device: str) -> str:
    return topics.up(device, topics.CSR)


def csr_message(old: EcSigner, device: str, rotation_id: int, new: EcSigner,
                cn: str | None = None) -> bytes:
    """What a device sends: a CSR for ``new`` (CN ``cn``, the device by default), proven by
    ``old``."""
    return rotation.csr_message(old, old.kid, device, rotation_id, csr_der(new, cn or device))


def command_args(cmd: FleetCommand) -> Any:
    """The CBOR arguments the command's signed bytes carry (what the device reads)."""
    _kid, _prot, payload, _sig = cose.split_sign1(cmd.signed)
    return cbor.loads(payload).get(5)


def rotation_row(engine: Any, rotation_id: int) -> KeyRotation:
    with Session(engine) as s:
        row = s.get(KeyRotation, rotation_id)
        assert row is not None
        s.expunge(row)
        return row


def command_row(engine: Any, command_id: int | None) -> FleetCommand:
    assert command_id is not None
    with Session(engine) as s:
        row = s.get(FleetCommand, command_id)
        assert row is not None
        s.expunge(row)
        return row


def audit_actions(engine: Any, prefix: str) -> list[tuple[str, str]]:
    with Session(engine) as s:
        rows = s.exec(select(AuditRecord).where(col(AuditRecord.action).startswith(prefix))
                      .order_by(col(AuditRecord.id))).all()
        return [(r.action, r.outcome) for r in rows]
