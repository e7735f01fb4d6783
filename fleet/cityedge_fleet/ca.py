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

**The CA directory** (what ``fleet serve`` reads; ``ca_rollover`` changes it)::

    root.crt                  the offline root's certificate (never its key)
    current                   the id of the intermediate that signs (absent: the layout
                              ``ca init`` wrote before issue 14, below)
    intermediates/<id>.key    every intermediate in service: the signing one and, during
    intermediates/<id>.crt    a rollover's overlap, the previous one (which only signs its
                              CRL). A certificate without its key is not in service (a
                              retirement cut short). ``<id>.token`` in place of
                              ``<id>.key``: the key is in the PKCS#11 token (``ca_custody``)
    crl.pem                   one CRL per intermediate in service (the broker's crlfile)
    broker-ca.pem             every intermediate in service + the root (the broker's cafile)
    retired/<id>.crt          intermediates taken out of service (their keys destroyed)
    intermediate.key/.crt     the first layout: the signer when ``current`` is absent

**Key custody** (``ca_custody``): the key files may be encrypted with a passphrase (PKCS#8,
PBES2-scrypt) and the intermediate may be held in a PKCS#11 token; the CA is given a
``Custody`` (``ca_custody.custody_of(settings)`` for the fleet) that opens them.

An intermediate's id is the first 8 bytes (hex) of its key identifier (RFC 5280
§4.2.1.2 method 1, SHA-1 of the public key): the ``AuthorityKeyIdentifier`` of every
certificate it issues starts with the same bytes, so a certificate names its issuer
(``issuer_id``). Each intermediate has a CN of its own (``... device CA g2``): OpenSSL
finds issuers and CRLs by name first.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cityedge_core.errors import PeerError
from cityedge_fleet.ca_custody import (
    DEVELOPMENT,
    TOKEN_SUFFIX,
    CaError,
    Custody,
    TokenConfig,
    generate_in_token,
    key_pem,
)
from cityedge_host.files import write_atomic

__all__ = ["CaError", "CertificateAuthority", "CsrError", "Custody", "init_ca"]

ROOT_KEY = "root.key"
ROOT_CERT = "root.crt"
INTERMEDIATE_KEY = "intermediate.key"
INTERMEDIATE_CERT = "intermediate.crt"
CRL_FILE = "crl.pem"
CURRENT_FILE = "current"
INTERMEDIATES_DIR = "intermediates"
RETIRED_DIR = "retired"
BROKER_BUNDLE = "broker-ca.pem"
ID_HEX = 16  # hex characters of an intermediate's id (8 bytes of its key identifier)
ROOT_VALIDITY_DAYS = 20 * 365  # days: the offline root
INTERMEDIATE_VALIDITY_DAYS = 3 * 365  # days: the online intermediate
BACKDATE_S = 300  # seconds certificates are backdated for clock skew
# CA certificates the root allows below it: its intermediate, and a successor root it
# cross-certifies (docs/SECURITY_TEAM.md "Roll the root over": with 1, devices that trust
# this root could not follow the cross-certificate to the next root's intermediates)
ROOT_PATH_LENGTH = 2


class CsrError(PeerError):
    """The CSR a device sent is malformed or does not match what it is enrolled as."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cityedge"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """A key file's contents: encrypted when ``password`` is given (``ca_custody``)."""
    return key_pem(key, password)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """An intermediate's id: 8 bytes of its key identifier (RFC 5280 §4.2.1.2 method 1)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest[:ID_HEX // 2].hex()


def issuer_id(cert: x509.Certificate) -> str | None:
    """The id of the intermediate that issued ``cert`` (from its AuthorityKeyIdentifier;
    None when it has none)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    return aki.key_identifier[:ID_HEX // 2].hex()


def issuer_id_of_pem(cert_pem: str | bytes) -> str | None:
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        return issuer_id(x509.load_pem_x509_certificate(data))
    except ValueError:
        return None


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
            crl_validity_s: int = 7 * 86400, root_password: bytes | None = None,
            custody: Custody = DEVELOPMENT) -> None:
    """Create the offline root in ``root_dir`` and the online intermediate in ``out_dir``.

    ``root_password`` encrypts the root key; ``custody`` says where the intermediate's key
    goes: a file encrypted with its passphrase file (or in clear: development), or, with a
    token, generated inside the token (the CA directory then gets the rollover layout:
    ``intermediates/<id>.crt``, ``<id>.token`` and ``current``)."""
    for path in (root_dir / ROOT_KEY, out_dir / INTERMEDIATE_KEY, out_dir / CURRENT_FILE):
        if path.exists():
            raise CaError("%s exists: refusing to overwrite a CA key" % path)
    if root_dir.resolve() == out_dir.resolve():
        raise CaError("the root directory must not be the online CA directory")
    password = custody.password() if custody.token is None else None
    if custody.require_encrypted and custody.token is None and password is None:
        raise CaError("production keeps the intermediate key encrypted or in a token: give "
                      "--password-file or --pkcs11-module")
    root_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(_name(name + " root CA"), _name(name + " root CA"), root_key.public_key(),
                    root_key, ROOT_VALIDITY_DAYS, ROOT_PATH_LENGTH, root_key.public_key())
    write_atomic(root_dir / ROOT_KEY, _key_pem(root_key, root_password), 0o600)
    write_atomic(root_dir / ROOT_CERT, _cert_pem(root), 0o644)
    if custody.token is not None:
        _init_in_token(out_dir, name, root_key, root, custody.token)
    else:
        inter_key = ec.generate_private_key(ec.SECP256R1())
        inter = _ca_cert(_name(name + " device CA"), root.subject, inter_key.public_key(),
                         root_key, INTERMEDIATE_VALIDITY_DAYS, 0, root_key.public_key())
        write_atomic(out_dir / INTERMEDIATE_KEY, _key_pem(inter_key, password), 0o600)
        write_atomic(out_dir / INTERMEDIATE_CERT, _cert_pem(inter), 0o644)
    write_atomic(out_dir / ROOT_CERT, _cert_pem(root), 0o644)
    ca = CertificateAuthority(out_dir, custody)
    ca.write_crl([], crl_validity_s)
    ca.write_broker_bundle()


def _init_in_token(out_dir: Path, name: str, root_key: ec.EllipticCurvePrivateKey,
                   root: x509.Certificate, token: TokenConfig) -> None:
    """The intermediate's key made inside the token, its certificate signed by the root."""
    key_bytes, public = generate_in_token(
        token, lambda pub: bytes.fromhex(key_id(pub)))
    inter = _ca_cert(_name(name + " device CA"), root.subject, public, root_key,
                     INTERMEDIATE_VALIDITY_DAYS, 0, root_key.public_key())
    write_token_marker(out_dir, key_bytes.hex(), inter, token)


def write_token_marker(ca_dir: Path, inter_id: str, cert: x509.Certificate,
                       token: TokenConfig) -> None:
    """Record an intermediate held in ``token``: its certificate and ``<id>.token`` in
    ``intermediates/``, then ``current`` naming it."""
    folder = ca_dir / INTERMEDIATES_DIR
    folder.mkdir(mode=0o755, exist_ok=True)
    write_atomic(folder / (inter_id + TOKEN_SUFFIX),
                 ("pkcs11 token=%s key=%s\n" % (token.token_label, token.key_label)).encode(),
                 0o644)
    write_atomic(folder / (inter_id + ".crt"), _cert_pem(cert), 0o644)
    write_atomic(ca_dir / CURRENT_FILE, (inter_id + "\n").encode(), 0o644)


@dataclass(frozen=True)
class Revoked:
    serial: int
    revoked_at: dt.datetime
    on_hold: bool = False  # suspended, not revoked for good (reason certificateHold)


@dataclass(frozen=True)
class Intermediate:
    """One intermediate in service: its certificate and key, and its id."""

    id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def _load_pair(key_path: Path, cert_path: Path, custody: Custody = DEVELOPMENT
               ) -> Intermediate:
    """The intermediate in ``key_path``/``cert_path``, checked to be a pair; its key from
    the file (``custody`` decrypts it) or, when ``<id>.token`` stands in for the file, from
    the token."""
    ca_dir = key_path.parent
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as e:
        raise CaError("CA directory %s is incomplete (%s: %s); run `cityedge ca init`"
                      % (ca_dir, e.filename, e.strerror)) from e
    except ValueError as e:
        raise CaError("CA directory %s holds a file that does not parse (%s)"
                      % (ca_dir, cert_path.name)) from e
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CaError("the intermediate certificate %s is not for an EC key" % cert_path)
    marker = key_path.with_suffix(TOKEN_SUFFIX)
    key: ec.EllipticCurvePrivateKey
    if not key_path.exists() and marker.exists():
        key = custody.load_token_key(key_id(public), public, marker)
    elif not key_path.exists():
        raise CaError("CA directory %s is incomplete (%s: no such file); run `cityedge ca "
                      "init`" % (ca_dir, key_path))
    else:
        key = custody.load_file_key(key_path)
    if public != key.public_key():
        raise CaError("intermediate key and certificate in %s do not match (%s)"
                      % (ca_dir, key_path.name))
    return Intermediate(key_id(key.public_key()), cert, key)


def read_current(ca_dir: Path) -> str | None:
    """The id the ``current`` pointer names (None: the first layout)."""
    try:
        text = (ca_dir / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CaError("cannot read %s: %s" % (ca_dir / CURRENT_FILE, e.strerror)) from e
    if len(text) != ID_HEX or any(c not in "0123456789abcdef" for c in text):
        raise CaError("%s does not name an intermediate id" % (ca_dir / CURRENT_FILE))
    return text


def in_service(ca_dir: Path, custody: Custody = DEVELOPMENT) -> list[Intermediate]:
    """Every complete pair in ``intermediates/`` (id order)."""
    out = []
    folder = ca_dir / INTERMEDIATES_DIR
    if folder.is_dir():
        held = {p.with_suffix(".key") for p in folder.glob("*" + TOKEN_SUFFIX)}
        for key_path in sorted(held | set(folder.glob("*.key"))):
            cert_path = key_path.with_suffix(".crt")
            if cert_path.is_file():
                out.append(_load_pair(key_path, cert_path, custody))
    return out


class CertificateAuthority:
    """The online intermediate that signs (``cert``), loaded from the service's CA
    directory, with the other intermediates still in service (``overlap``): during a
    rollover the broker trusts them all and the CRL file holds one CRL for each.
    ``custody`` opens the keys (``ca_custody``; development: unencrypted files)."""

    def __init__(self, ca_dir: Path, custody: Custody = DEVELOPMENT) -> None:
        self.dir = ca_dir
        self.custody = custody
        try:
            self.root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
        except OSError as e:
            raise CaError("CA directory %s is incomplete (%s); run `cityedge ca init`"
                          % (ca_dir, e.strerror)) from e
        except ValueError as e:
            raise CaError("CA directory %s holds a file that does not parse" % ca_dir) from e
        current = read_current(ca_dir)
        pairs = in_service(ca_dir, custody)
        if current is None:  # the first layout
            signer = _load_pair(ca_dir / INTERMEDIATE_KEY, ca_dir / INTERMEDIATE_CERT,
                                custody)
        else:
            found = [p for p in pairs if p.id == current]
            if not found:
                raise CaError("%s names intermediate %s, which is not in %s"
                              % (ca_dir / CURRENT_FILE, current, ca_dir / INTERMEDIATES_DIR))
            signer = found[0]
        self.signer = signer
        self.id = signer.id
        self.cert = signer.cert
        self._key = signer.key
        self.overlap = [p for p in pairs if p.id != signer.id]

    @property
    def intermediates(self) -> list[Intermediate]:
        """Every intermediate in service, the signing one first."""
        return [self.signer, *self.overlap]

    @property
    def crl_path(self) -> Path:
        return self.dir / CRL_FILE

    def chain_pem(self, issuer: str | None = None) -> str:
        """The intermediate a device presents after its certificate: the one with id
        ``issuer`` if it is in service, else the signing one."""
        for inter in self.intermediates:
            if inter.id == issuer:
                return _cert_pem(inter.cert).decode()
        return _cert_pem(self.cert).decode()

    def bundle_pem(self) -> str:
        """What the broker trusts: every intermediate in service + the root (``cafile``)."""
        return b"".join([*(_cert_pem(i.cert) for i in self.intermediates),
                         _cert_pem(self.root)]).decode()

    def device_trust_pem(self) -> str:
        """What a device trusts for the broker's server certificate: the root alone (the
        broker sends its intermediate), so an intermediate can be rolled over and retired
        without touching a device's trust store."""
        return self.root_pem()

    @property
    def broker_bundle_path(self) -> Path:
        return self.dir / BROKER_BUNDLE

    def write_broker_bundle(self) -> Path:
        """Write ``bundle_pem`` where the broker's ``cafile`` points (world-readable)."""
        write_atomic(self.broker_bundle_path, self.bundle_pem().encode(), 0o644)
        return self.broker_bundle_path

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

    def make_crl(self, revoked: list[Revoked], validity_s: int,
                 issuer: Intermediate | None = None) -> bytes:
        """A CRL signed by ``issuer`` (the signing intermediate by default)."""
        issuer = issuer or self.signer
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(now - dt.timedelta(seconds=BACKDATE_S))
            .next_update(now + dt.timedelta(seconds=validity_s))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for entry in revoked:
            item = (x509.RevokedCertificateBuilder().serial_number(entry.serial)
                    .revocation_date(entry.revoked_at))
            if entry.on_hold:
                item = item.add_extension(x509.CRLReason(x509.ReasonFlags.certificate_hold),
                                          critical=False)
            builder = builder.add_revoked_certificate(item.build())
        return builder.sign(issuer.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)

    def write_crl(self, revoked: list[Revoked], validity_s: int) -> Path:
        """Write a fresh CRL for every intermediate in service into one file (the broker
        refuses a client whose issuer has no CRL); world-readable: the broker reads it as
        its own user. Each CRL lists every revoked serial: serials are random 159-bit
        numbers and a CRL entry matches issuer *and* serial, so an entry in the other
        intermediate's list revokes nothing else, and no entry can land in the wrong list
        (a credential of the first layout has no issuer recorded)."""
        data = b"".join(self.make_crl(revoked, validity_s, i) for i in self.intermediates)
        write_atomic(self.crl_path, data, 0o644)
        return self.crl_path

    def published_crls(self) -> list[x509.CertificateRevocationList] | None:
        """The CRLs in the published file (None: missing or unreadable)."""
        try:
            return load_crls(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None

    def _crl_per_intermediate(self) -> list[x509.CertificateRevocationList] | None:
        """The published CRL of each intermediate in service, in order (None: one has none,
        or one is not signed by its intermediate)."""
        crls = self.published_crls()
        if crls is None:
            return None
        out = []
        for inter in self.intermediates:
            mine = [c for c in crls if c.issuer == inter.cert.subject
                    and c.is_signature_valid(inter.key.public_key())]
            if len(mine) != 1:
                return None
            out.append(mine[0])
        return out

    def crl_serials(self) -> set[int] | None:
        """Serial numbers the published CRLs list (None: no readable CRL for some
        intermediate in service, or CRLs that list different serials)."""
        crls = self._crl_per_intermediate()
        if crls is None:
            return None
        sets = [{entry.serial_number for entry in crl} for crl in crls]
        return sets[0] if all(x == sets[0] for x in sets) else None

    def crl_due(self, now: dt.datetime | None = None) -> bool:
        """True when some intermediate in service has no readable CRL, or one with less
        than half its life left."""
        crls = self._crl_per_intermediate()
        if crls is None:
            return True
        now = now or _now()
        for crl in crls:
            nxt = crl.next_update_utc
            if nxt is None or nxt - now < (nxt - crl.last_update_utc) / 2:
                return True
        return False


_CRL_BEGIN = b"-----BEGIN X509 CRL-----"


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (ValueError when there is none or one does not parse)."""
    parts = data.split(_CRL_BEGIN)[1:]
    if not parts:
        raise ValueError("no CRL in the file")
    return [x509.load_pem_x509_crl(_CRL_BEGIN + part) for part in parts]


_cache: dict[tuple[Path, Custody], tuple[tuple[object, ...], CertificateAuthority]] = {}


def _stamp(ca_dir: Path) -> tuple[object, ...]:
    """What changes when a rollover or retirement changes the CA directory."""
    out: list[object] = []
    for name in (CURRENT_FILE, INTERMEDIATES_DIR, INTERMEDIATE_CERT):
        try:
            st = (ca_dir / name).stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def load_current(ca_dir: Path, custody: Custody = DEVELOPMENT) -> CertificateAuthority:
    """The CA as the directory holds it now, loaded again only after a rollover or a
    retirement changed it (a few ``stat`` calls per use): a running ``fleet serve`` signs
    with the new intermediate from the moment ``current`` points at it."""
    stamp = _stamp(ca_dir)
    hit = _cache.get((ca_dir, custody))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    ca = CertificateAuthority(ca_dir, custody)
    _cache[(ca_dir, custody)] = (stamp, ca)
    return ca


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
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
        ca._key.public_key()), critical=False)
    cert = builder.sign(ca._key, hashes.SHA256())
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out_dir / (cn + ".key"), out_dir / (cn + ".crt")
    write_atomic(key_path, _key_pem(key), 0o600)
    write_atomic(cert_path, _cert_pem(cert) + _cert_pem(ca.cert), 0o644)
    return cert_path, key_path
