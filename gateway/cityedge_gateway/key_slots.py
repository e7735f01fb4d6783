"""The gateway's identity in two key slots and a pointer: rotation that survives a power cut.

The identity is one P-256 key (it signs the gateway's batches, results and status, and is
its TLS client key) and the certificate the fleet issued for it. Both live in
``[gateway] identity_dir``::

    key0.pem  cert0.pem     slot 0: PKCS#8 key (mode 0600) and certificate chain (PEM)
    key1.pem  cert1.pem     slot 1
    current                 the pointer: "0" or "1", the slot the gateway uses
    pending                 "<slot> <rotation id>": a rotation made a key, awaits its cert

The protocol is ``cityedge_core.rotation`` (its docstring is the spec); this is the
gateway's file keeping for it. Every write is ``cityedge_host.files.write_atomic``
(temp file, fsync, rename, directory fsync) and each step's pointer-like write comes last:

===============  =========================================================================
step             writes, in order
===============  =========================================================================
seed (1st boot)  key0, cert0 (copied from the config's ``key_file``/``cert_file``),
                 ``current``; then the source key file is removed (the identity moved)
``rotate``       remove the other slot's cert (a stale cert never pairs with a new key)
                 and erase its key, write key<other> (a new key), ``pending``
``install-cert`` cert<other> (leaf + the current chain's intermediates), ``current`` (the
                 switch: one atomic rename), remove ``pending``
``erase-key``    overwrite and remove key<other>, remove cert<other> (only the slot that
                 is *not* current, and only when its key has the kid named)
===============  =========================================================================

So at every cut ``current`` names a slot whose key and certificate match: before the
pointer moves it is the old slot (untouched by ``rotate`` and ``install-cert``); after,
the new one, whose cert was durable before the pointer was written. A half-made pending
slot is ignored and made again at the next ``rotate``. ``open`` checks the pair (the
certificate holds the key, its CN is the device) and refuses to start otherwise: a
gateway that would connect with a key its certificate does not hold would be locked out.

Removal overwrites the key file and fsyncs before unlinking, but an SD card's wear
levelling may keep old blocks: the key is erased from the file system, not from the
flash's spare area (the fleet revoked its certificate before asking).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cityedge_core import rotation
from cityedge_host.crypto import EcSigner, KeyFileError, public_sec1
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

log = logging.getLogger(__name__)

CURRENT = "current"
PENDING = "pending"
SLOTS = (0, 1)


class IdentityError(UserError, ValueError):
    """The identity directory cannot give a consistent identity, or a rotation step does
    not fit what is on disk (the message says which)."""


@dataclass(frozen=True)
class Identity:
    """The identity in use: its slot, its key, and the files TLS loads."""

    slot: int
    signer: EcSigner
    key_file: Path
    cert_file: Path

    @property
    def kid(self) -> bytes:
        return self.signer.kid


def _unlink(path: Path) -> None:
    """Remove ``path`` durably (the directory is fsynced); absent is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _overwrite(path: Path) -> None:
    """Overwrite a file's bytes with zeros, durably (absent is fine)."""
    with contextlib.suppress(FileNotFoundError), path.open("r+b") as f:
        f.write(bytes(os.fstat(f.fileno()).st_size))
        f.flush()
        os.fsync(f.fileno())


def _erase(path: Path) -> None:
    """Overwrite a key file with zeros, then remove it."""
    _overwrite(path)
    _unlink(path)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise IdentityError("cannot read key %s: %s" % (path, e.strerror)) from e
    except (ValueError, TypeError) as e:
        raise IdentityError("%s is not an unencrypted PEM private key" % path) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1):
        raise IdentityError("%s is not a P-256 private key" % path)
    return key


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise IdentityError("cannot read certificate %s: %s" % (path, e.strerror)) from e
    except ValueError as e:
        raise IdentityError("%s is not a PEM certificate" % path) from e
    return certs


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def build_csr(key: ec.EllipticCurvePrivateKey, device: str) -> bytes:
    """The PKCS#10 request the core's ``csr.build_csr`` makes on a device (CN and SAN URI
    = the device), here with OpenSSL: DER."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier(device)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


class KeySlots:
    """The identity directory of one gateway (one process writes it)."""

    def __init__(self, directory: Path, device: str) -> None:
        self.dir = directory
        self.device = device

    def key_file(self, slot: int) -> Path:
        return self.dir / ("key%d.pem" % slot)

    def cert_file(self, slot: int) -> Path:
        return self.dir / ("cert%d.pem" % slot)

    # -- reading -----------------------------------------------------------------------

    def current_slot(self) -> int | None:
        text = _read_text(self.dir / CURRENT)
        if text is None:
            return None
        if text not in ("0", "1"):
            raise IdentityError("%s holds %r; it must be 0 or 1"
                                % (self.dir / CURRENT, text[:20]))
        return int(text)

    def pending(self) -> tuple[int, int] | None:
        """``(slot, rotation_id)`` of a key that awaits its certificate, if any."""
        text = _read_text(self.dir / PENDING)
        cur = self.current_slot()
        try:
            slot, rid = (int(p) for p in (text or "").split())
        except ValueError:
            return None  # none, or torn by hand: the next rotate makes a new one
        if slot not in SLOTS or slot == cur or not self.key_file(slot).is_file():
            return None
        return slot, rid

    def _identity(self, slot: int) -> Identity:
        key_path, cert_path = self.key_file(slot), self.cert_file(slot)
        key = _load_key(key_path)
        certs = _certs(cert_path)
        sec1 = public_sec1(key.public_key())
        leaf = certs[0]
        leaf_key = leaf.public_key()
        if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or public_sec1(
                leaf_key) != sec1:
            raise IdentityError("%s does not hold the key of %s" % (cert_path, key_path))
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [c.value for c in cns] != [self.device]:
            raise IdentityError("%s is not a certificate of %s" % (cert_path, self.device))
        return Identity(slot, EcSigner(key), key_path, cert_path)

    def load(self) -> Identity:
        """The current identity; IdentityError if there is none or it is inconsistent."""
        slot = self.current_slot()
        if slot is None:
            raise IdentityError("%s holds no identity yet (no %s)" % (self.dir, CURRENT))
        return self._identity(slot)

    def open(self, seed_key: Path, seed_cert: Path) -> Identity:
        """The current identity; on first use, seeded from the config's key and
        certificate files (the key file is removed once the slot holds it)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for debris in self.dir.glob("*.tmp"):  # a write cut before its rename
            _erase(debris)
        if self.current_slot() is None:
            self._seed(seed_key, seed_cert)
        ident = self.load()
        self.forget_source(seed_key)
        return ident

    def forget_source(self, seed_key: Path) -> None:
        """Remove the config's initial key file once a slot holds that key (the move's
        last step; done again at each start until it succeeds)."""
        if not seed_key.is_file():
            return
        try:
            kid = EcSigner(_load_key(seed_key)).kid
        except IdentityError:
            return
        held = set()
        for slot in SLOTS:
            with contextlib.suppress(IdentityError, KeyFileError):
                held.add(EcSigner(_load_key(self.key_file(slot))).kid)
        if kid not in held:
            log.warning("%s is not used: the identity is in %s", seed_key, self.dir)
            return
        try:
            _unlink(seed_key)
        except OSError as e:
            log.warning("the initial key %s could not be removed (%s): remove it by hand; "
                        "%s holds it now", seed_key, e.strerror, self.dir)

    def _seed(self, key_path: Path, cert_path: Path) -> None:
        key = _load_key(key_path)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM)
                         for c in _certs(cert_path))
        write_atomic(self.key_file(0), _pem(key), 0o600)
        write_atomic(self.cert_file(0), chain, 0o644)
        self._identity(0)  # the pair must match before it becomes current
        write_atomic(self.dir / CURRENT, b"0\n", 0o644)
        log.info("identity moved into %s (slot 0)", self.dir)

    # -- the rotation's steps ------------------------------------------------------------

    def begin(self, rotation_id: int) -> tuple[EcSigner, bytes]:
        """``rotate``: a new key in the slot that is not current, its CSR (DER)."""
        cur = self.load()
        other = 1 - cur.slot
        key = ec.generate_private_key(ec.SECP256R1())
        _unlink(self.cert_file(other))
        _erase(self.key_file(other))  # a half-made key, or an old one never erased
        write_atomic(self.key_file(other), _pem(key), 0o600)
        write_atomic(self.dir / PENDING, b"%d %d\n" % (other, rotation_id), 0o644)
        return EcSigner(key), build_csr(key, self.device)

    def install(self, rotation_id: int, cert_der: bytes) -> Identity:
        """``install-cert``: store the certificate beside the pending key and make that
        slot current. IdentityError (nothing written) when it does not fit."""
        cur = self.load()
        pending = self.pending()
        if pending is None:
            raise IdentityError("no key awaits a certificate here (no rotate taken, or "
                                "its key was lost in a restart): rotate again")
        slot, rid = pending
        if rid != rotation_id:
            raise IdentityError("the pending key belongs to rotation %d, not %d"
                                % (rid, rotation_id))
        key = _load_key(self.key_file(slot))
        if not rotation.cert_holds_key(cert_der, public_sec1(key.public_key())):
            raise IdentityError("the certificate does not hold the pending key")
        try:
            leaf = x509.load_der_x509_certificate(cert_der)
        except ValueError as e:
            raise IdentityError("the certificate is not DER X.509") from e
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [c.value for c in cns] != [self.device]:
            raise IdentityError("the certificate is not one of %s" % self.device)
        intermediates = _certs(cur.cert_file)[1:]
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM)
                         for c in [leaf, *intermediates])
        write_atomic(self.cert_file(slot), chain, 0o644)
        new = self._identity(slot)  # checked before the pointer moves
        write_atomic(self.dir / CURRENT, b"%d\n" % slot, 0o644)
        _unlink(self.dir / PENDING)
        return new

    def erase(self, kid: bytes) -> bool:
        """``erase-key``: erase the slot that is not current if its key has ``kid``.
        True when erased; False when no such key is here; IdentityError for the current
        key (never erased)."""
        cur = self.load()
        if kid == cur.kid:
            raise IdentityError("%s is the current key: it is never erased" % kid.hex())
        other = 1 - cur.slot
        path = self.key_file(other)
        held: bytes | None = None
        if path.is_file():
            try:
                held = EcSigner(_load_key(path)).kid
            except (IdentityError, KeyFileError):
                held = b""  # zeroed by an erase that was cut short: finish it
        if held is not None and held not in (kid, b""):
            return False  # another key (a pending one): not named, kept
        if held is not None:
            _erase(path)
        _unlink(self.cert_file(other))
        _unlink(self.dir / PENDING)
        return held == kid

    def files(self) -> list[Path]:
        """Every file in the directory (for checks and for the operator)."""
        return sorted(p for p in self.dir.iterdir() if p.is_file())
