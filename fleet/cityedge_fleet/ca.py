"""The fleet's certificate authority: an offline root, an online intermediate, device
certificates from PKCS#10 CSRs, and the CRL the broker loads.

``init_ca`` runs once, on the operator's machine: the root key goes only to the directory
the operator names (mode 0600) and never into the service's database or CA directory; the
service's CA directory gets the intermediate key and certificate, a copy of the root
certificate and a first CRL.

``CertificateAuthority.sign_csr`` is the one place that accepts or rejects a CSR:

- the CSR parses as PEM PKCS#10 and its self-signature verifies (RFC 2986 §3);
- its key is EC on P-256 (the device signs batches with the same curve, ES256);
- its subject CN equals the device id it is enrolled as.

The certificate it issues ignores every extension the CSR asks for and sets its own:
CN = device id, SAN URI = the device URN (RFC 9039), basicConstraints CA:false (critical),
keyUsage digitalSignature (critical), extendedKeyUsage clientAuth, validity ``days``
(90 by default), a random 159-bit serial (RFC 5280 §4.1.2.2 allows up to 20 octets).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cityedge_core.errors import LocalError, PeerError
from cityedge_host.files import write_atomic

ROOT_KEY = "root.key"
ROOT_CERT = "root.crt"
INTERMEDIATE_KEY = "intermediate.key"
INTERMEDIATE_CERT = "intermediate.crt"
CRL_FILE = "crl.pem"
ROOT_VALIDITY_DAYS = 20 * 365  # days: the offline root
INTERMEDIATE_VALIDITY_DAYS = 3 * 365  # days: the online intermediate
BACKDATE_S = 300  # seconds certificates are backdated for clock skew


class CsrError(PeerError):
    """The CSR a device sent is malformed or does not match what it is enrolled as."""


class CaError(LocalError):
    """The CA's own files are missing, unreadable or inconsistent."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cityedge"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_cert(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             signing_key: ec.EllipticCurvePrivateKey, days: int, path_length: int | None,
             issuer_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),
                       critical=False)
        .sign(signing_key, hashes.SHA256())
    )


def init_ca(root_dir: Path, out_dir: Path, *, name: str = "cityedge",
            crl_validity_s: int = 7 * 86400) -> None:
    """Create the offline root in ``root_dir`` and the online intermediate in ``out_dir``."""
    for path in (root_dir / ROOT_KEY, out_dir / INTERMEDIATE_KEY):
        if path.exists():
            raise CaError("%s exists: refusing to overwrite a CA key" % path)
    if root_dir.resolve() == out_dir.resolve():
        raise CaError("the root directory must not be the online CA directory")
    root_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(_name(name + " root CA"), _name(name + " root CA"), root_key.public_key(),
                    root_key, ROOT_VALIDITY_DAYS, 1, root_key.public_key())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert(_name(name + " device CA"), root.subject, inter_key.public_key(),
                     root_key, INTERMEDIATE_VALIDITY_DAYS, 0, root_key.public_key())
    write_atomic(root_dir / ROOT_KEY, _key_pem(root_key), 0o600)
    write_atomic(root_dir / ROOT_CERT, _cert_pem(root), 0o644)
    write_atomic(out_dir / INTERMEDIATE_KEY, _key_pem(inter_key), 0o600)
    write_atomic(out_dir / INTERMEDIATE_CERT, _cert_pem(inter), 0o644)
    write_atomic(out_dir / ROOT_CERT, _cert_pem(root), 0o644)
    ca = CertificateAuthority(out_dir)
    ca.write_crl([], crl_validity_s)


@dataclass(frozen=True)
class Revoked:
    serial: int
    revoked_at: dt.datetime
    on_hold: bool = False  # suspended, not revoked for good (reason certificateHold)


class CertificateAuthority:
    """The online intermediate, loaded from the service's CA directory."""

    def __init__(self, ca_dir: Path) -> None:
        self.dir = ca_dir
        try:
            key = serialization.load_pem_private_key(
                (ca_dir / INTERMEDIATE_KEY).read_bytes(), password=None)
            self.cert = x509.load_pem_x509_certificate((ca_dir / INTERMEDIATE_CERT).read_bytes())
            self.root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
        except OSError as e:
            raise CaError("CA directory %s is incomplete (%s); run `cityedge ca init`"
                          % (ca_dir, e.strerror)) from e
        except ValueError as e:
            raise CaError("CA directory %s holds a file that does not parse" % ca_dir) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError("the intermediate key in %s is not an EC key" % ca_dir)
        self._key = key
        if self.cert.public_key() != key.public_key():
            raise CaError("intermediate key and certificate in %s do not match" % ca_dir)

    @property
    def crl_path(self) -> Path:
        return self.dir / CRL_FILE

    def chain_pem(self) -> str:
        return _cert_pem(self.cert).decode()

    def bundle_pem(self) -> str:
        """What a verifier trusts: intermediate + root (the broker's ``cafile``)."""
        return (_cert_pem(self.cert) + _cert_pem(self.root)).decode()

    def root_pem(self) -> str:
        return _cert_pem(self.root).decode()

    @staticmethod
    def check_csr(csr_pem: str | bytes, device_id: str) -> x509.CertificateSigningRequest:
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as e:
            raise CsrError("the CSR is not a PEM PKCS#10 request") from e
        try:
            key = csr.public_key()
        except (ValueError, x509.UnsupportedGeneralNameType) as e:
            raise CsrError("the CSR's public key cannot be read") from e
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                key.curve, ec.SECP256R1):
            raise CsrError("the CSR's key must be EC P-256 (ES256), got %s"
                           % type(key).__name__.replace("PublicKey", ""))
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != device_id:
            got = cns[0].value if cns else "(none)"
            raise CsrError("the CSR's CN %r must equal the device id %r" % (got, device_id))
        return csr

    def sign_csr(self, csr_pem: str | bytes, device_id: str, days: int = 90
                 ) -> x509.Certificate:
        csr = self.check_csr(csr_pem, device_id)
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # check_csr made sure
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_id)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def make_crl(self, revoked: list[Revoked], validity_s: int) -> bytes:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(seconds=BACKDATE_S))
            .next_update(now + dt.timedelta(seconds=validity_s))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for entry in revoked:
            item = (x509.RevokedCertificateBuilder().serial_number(entry.serial)
                    .revocation_date(entry.revoked_at))
            if entry.on_hold:
                item = item.add_extension(x509.CRLReason(x509.ReasonFlags.certificate_hold),
                                          critical=False)
            builder = builder.add_revoked_certificate(item.build())
        return builder.sign(self._key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)

    def write_crl(self, revoked: list[Revoked], validity_s: int) -> Path:
        """Write a fresh CRL (world-readable: the broker reads it as its own user)."""
        write_atomic(self.crl_path, self.make_crl(revoked, validity_s), 0o644)
        return self.crl_path

    def crl_serials(self) -> set[int] | None:
        """Serial numbers the published CRL lists (None: no readable CRL)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None
        return {entry.serial_number for entry in crl}

    def crl_due(self, now: dt.datetime | None = None) -> bool:
        """True when the CRL is missing, unreadable, or has less than half its life left."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return True
        now = now or _now()
        nxt = crl.next_update_utc
        if nxt is None:
            return True
        life = nxt - crl.last_update_utc
        return nxt - now < life / 2


def issue_service(ca: CertificateAuthority, cn: str, out_dir: Path,
                  server_names: tuple[str, ...] = (), days: int = 90) -> tuple[Path, Path]:
    """A key and certificate for one of the fleet's own services, written to ``out_dir``.

    ``server_names`` makes it a TLS server certificate (the broker: DNS names or IP
    addresses); otherwise it is a client certificate whose CN names a fleet service to
    the broker (``broker_acl``: fleet-ingest, fleet-commands, fleet-control, each with an
    optional ``-<suffix>``). The key is made here, on the service's host, mode 0600.
    """
    import ipaddress

    from cityedge_fleet import broker_acl

    if not server_names and broker_acl.identity_kind(cn) not in broker_acl.SERVICE_KINDS:
        raise CaError("%r is not a fleet service identity: fleet-ingest, fleet-commands or "
                      "fleet-control, with an optional -<suffix> (the broker grants by CN)"
                      % cn)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=BACKDATE_S))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server_names:
        alt: list[x509.GeneralName] = []
        for n in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(ca._key, hashes.SHA256())
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out_dir / (cn + ".key"), out_dir / (cn + ".crt")
    write_atomic(key_path, _key_pem(key), 0o600)
    write_atomic(cert_path, _cert_pem(cert) + _cert_pem(ca.cert), 0o644)
    return cert_path, key_path
