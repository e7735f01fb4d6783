"""A device's certificate from its own CSR, and the ``install`` request's fields that carry
it: what the fleet's enrollment gives a device, for tests that provision one without the
fleet (``tests/provisioning``, and the built firmware's boot in ``tests/firmware``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cityedge_core import frame

from support.mosquitto import TestPKI

DER = serialization.Encoding.DER


def issue_for_csr(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                  csr_der: bytes) -> x509.Certificate:
    req = x509.load_der_x509_csr(csr_der)
    assert req.is_signature_valid
    cn = req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(req.subject).issuer_name(ca_cert.subject)
            .public_key(req.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                str(cn))]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def install_fields(pki: TestPKI, cert: x509.Certificate, port: int,
                   fleet_keys: list[bytes] | None = None) -> dict[int, Any]:
    return {
        frame.F_CHAIN: [cert.public_bytes(DER)],
        frame.F_CA: [pki.ca_cert.public_bytes(DER)],
        frame.F_BROKER: {"host": "127.0.0.1", "port": port, "server_hostname": "localhost"},
        frame.F_CONFIG: {"note": "test"},
        frame.F_FLEET_KEYS: fleet_keys or [],
    }
