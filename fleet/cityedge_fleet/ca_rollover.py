"""Intermediate CA rollover: a new online intermediate signed by the offline root, the old
one kept in service for the overlap (``cityedge ca rollover``, run where the root lives).

The steps, each file written atomically, in an order that leaves a CA that signs after a
crash at any point (``tests/fleet/test_fleet_ca_rollover.py`` cuts every write):

1. **Check the root.** ``root_dir`` holds the root key and certificate, the key is the
   certificate's, and the CA directory's ``root.crt`` is that certificate; refused
   otherwise (``RolloverRefused``). A directory already in an overlap is refused too: one
   rollover at a time (retire the old intermediate first, ``ca_retire``).
2. **First layout.** A directory ``ca init`` wrote before issue 14 (``intermediate.key``
   without ``current``) is moved to the new one: the pair is written to
   ``intermediates/<id>.*``, then ``current`` names it, then the old files go. Until
   ``current`` is written the old files sign; after, the pair they were copied to does.
3. **The new intermediate** is made (P-256, signed by the root, path length 0, a CN of
   its own: ``... device CA g<n>``) and staged as ``next.key`` / ``next.crt``. A rollover
   cut short and run again takes the staged pair instead of making another.
4. **Trust before use.** The CRL file gets a CRL of each intermediate (the old one's
   entries kept, the new one's empty) and ``broker-ca.pem`` lists both intermediates and
   the root: the broker trusts the new intermediate before anything it signed exists.
5. **Switch.** The staged pair is written to ``intermediates/<new>.*``, then ``current``
   names it: from this write on the new intermediate signs every certificate
   (enrollment, rotation, renewal, services); ``fleet serve`` sees the change at its next
   use of the CA (``ca.load_current``). Then the staged files are removed.

The broker is told by SIGHUP between steps 4 and 5 (``before_switch``; Mosquitto
re-reads ``cafile`` and ``crlfile`` on SIGHUP): ``ca rollover`` sends it with
``--broker-pid-file`` or the fleet's ``CITYEDGE_BROKER_PID_FILE``, and says so loudly
when it cannot (until the broker re-reads them it refuses the new intermediate's
certificates). Devices need nothing: they trust the root for the broker's certificate
(the broker sends its intermediate), see ``CertificateAuthority.device_trust_pem``. The
devices then move by a rotation campaign (``--select 'intermediate=<old id>'``) and the
old intermediate is retired once none depends on it (``ca_retire``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cityedge_fleet.ca import (
    CRL_FILE,
    CURRENT_FILE,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    INTERMEDIATE_VALIDITY_DAYS,
    INTERMEDIATES_DIR,
    ROOT_CERT,
    ROOT_KEY,
    CaError,
    CertificateAuthority,
    Intermediate,
    Revoked,
    _ca_cert,
    _cert_pem,
    _key_pem,
    key_id,
    load_crls,
)
from cityedge_fleet.ca_custody import DEVELOPMENT, Custody, load_key, overwrite
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

NEXT_KEY = "next.key"
NEXT_CERT = "next.crt"
_GENERATION = re.compile(r"^(.*?) g([0-9]{1,6})$")


class RolloverRefused(UserError):
    """The rollover cannot run as asked (no root key, another root, an overlap open)."""


@dataclass(frozen=True)
class RolloverResult:
    old_id: str
    new_id: str
    new_subject: str
    new_not_after: dt.datetime
    migrated: bool  # the directory was in the first layout


def remove(path: Path) -> None:
    """Remove ``path`` (a missing one is fine: a step run again)."""
    path.unlink(missing_ok=True)


def destroy_key(path: Path) -> None:
    """Overwrite a private key file with random bytes, then remove it (a missing one is
    fine: a step run again)."""
    if overwrite(path):
        remove(path)


def load_root(root_dir: Path, ca_dir: Path, root_password_file: Path | None = None
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The root key and certificate, checked against each other and the CA directory;
    an encrypted root key is opened with the passphrase in ``root_password_file``."""
    key_path, cert_path = root_dir / ROOT_KEY, root_dir / ROOT_CERT
    if not key_path.is_file():
        raise RolloverRefused(
            "no root key at %s" % key_path,
            "run `ca rollover` where the offline root lives (its medium mounted), "
            "--root-dir naming the directory `ca init --root-dir` wrote")
    root_custody = Custody(password_file=root_password_file)
    try:
        key = load_key(key_path, root_custody.password, asked_from=str(
            root_password_file or "--root-password-file"))
    except CaError as e:
        raise RolloverRefused(str(e)) from e
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as e:
        raise RolloverRefused("cannot read the root in %s: %s" % (root_dir, e.strerror)) from e
    except ValueError as e:
        raise RolloverRefused("the root key or certificate in %s does not parse"
                              % root_dir) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        raise RolloverRefused("the root key %s does not match the root certificate %s"
                              % (key_path, cert_path),
                              "give the directory holding the root's own key")
    try:
        ca_root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
    except (OSError, ValueError) as e:
        raise RolloverRefused("the CA directory %s has no readable %s" % (ca_dir, ROOT_CERT),
                              "name the fleet's CA directory (CITYEDGE_CA_DIR)") from e
    if ca_root != cert:
        raise RolloverRefused("the CA directory %s belongs to another root than %s"
                              % (ca_dir, cert_path))
    return key, cert


def _next_subject(current: x509.Certificate) -> x509.Name:
    """The current intermediate's name with the next generation (``... g2``, ``g3``)."""
    cns = current.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else "device CA"
    m = _GENERATION.match(cn)
    base, gen = (m.group(1), int(m.group(2))) if m else (cn, 1)
    attrs = [a for a in current.subject if a.oid != NameOID.COMMON_NAME]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME,
                                                 "%s g%d" % (base, gen + 1))])


def _staged(ca_dir: Path, root: x509.Certificate, custody: Custody = DEVELOPMENT
            ) -> Intermediate | None:
    """The pair a rollover cut short staged, if it is whole and the root's (a staged key
    that does not open is made again: it never signed anything)."""
    try:
        key = custody.load_file_key(ca_dir / NEXT_KEY)
        cert = x509.load_pem_x509_certificate((ca_dir / NEXT_CERT).read_bytes())
    except (OSError, ValueError, CaError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        return None
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return None
    return Intermediate(key_id(key.public_key()), cert, key)


def _migrate_first_layout(ca_dir: Path, custody: Custody = DEVELOPMENT) -> bool:
    """Step 2; True when the directory was in the first layout."""
    if (ca_dir / CURRENT_FILE).exists():
        for name in (INTERMEDIATE_KEY, INTERMEDIATE_CERT):  # a migration cut short
            if name == INTERMEDIATE_KEY:
                destroy_key(ca_dir / name)
            else:
                remove(ca_dir / name)
        return False
    ca = CertificateAuthority(ca_dir, custody)  # the first layout's signer
    folder = ca_dir / INTERMEDIATES_DIR
    folder.mkdir(mode=0o755, exist_ok=True)
    write_atomic(folder / (ca.id + ".key"), _key_pem(ca.signer.key, custody.password()),
                 0o600)
    write_atomic(folder / (ca.id + ".crt"), _cert_pem(ca.cert), 0o644)
    write_atomic(ca_dir / CURRENT_FILE, (ca.id + "\n").encode(), 0o644)
    destroy_key(ca_dir / INTERMEDIATE_KEY)
    remove(ca_dir / INTERMEDIATE_CERT)
    return True


def _kept_entries(ca: CertificateAuthority) -> list[Revoked]:
    """What the signing intermediate's published CRL lists, to list it again."""
    try:
        crls = load_crls(ca.crl_path.read_bytes())
    except (OSError, ValueError):
        return []
    out = []
    for crl in crls:
        if crl.issuer != ca.cert.subject:
            continue
        for entry in crl:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            except x509.ExtensionNotFound:
                reason = None
            out.append(Revoked(entry.serial_number, entry.revocation_date_utc,
                               on_hold=reason == x509.ReasonFlags.certificate_hold))
        break
    return out


def rollover(root_dir: Path, ca_dir: Path, *, crl_validity_s: int = 7 * 86400,
             days: int = INTERMEDIATE_VALIDITY_DAYS,
             before_switch: Callable[[], None] | None = None,
             root_password_file: Path | None = None,
             custody: Custody = DEVELOPMENT) -> RolloverResult:
    """The steps in the module docstring; returns the old and the new intermediate.
    ``before_switch`` runs between steps 4 and 5: the place to reload the broker, so it
    trusts the new intermediate before a certificate of it exists. ``root_password_file``
    opens an encrypted root key; ``custody`` opens the intermediates' keys, and the new
    intermediate's key file is encrypted with its passphrase (``ca_custody``)."""
    root_key, root = load_root(root_dir, ca_dir, root_password_file)  # 1
    try:
        migrated = _migrate_first_layout(ca_dir, custody)  # 2
        ca = CertificateAuthority(ca_dir, custody)
        password = custody.password()
    except CaError as e:
        raise RolloverRefused(str(e)) from e
    if custody.require_encrypted and password is None:
        raise RolloverRefused("production keeps the new intermediate's key encrypted: give "
                              "its passphrase file (--password-file)")
    staged = _staged(ca_dir, root, custody)
    if staged is not None and staged.id == ca.id:  # cut after the switch: only tidy up
        destroy_key(ca_dir / NEXT_KEY)
        remove(ca_dir / NEXT_CERT)
        return _result(ca.overlap[0] if ca.overlap else ca.signer, staged, migrated)
    if staged is None:  # a key overwritten by step 5's clean-up cut short, or nothing
        destroy_key(ca_dir / NEXT_KEY)
        remove(ca_dir / NEXT_CERT)
    others = [i.id for i in ca.overlap if staged is None or i.id != staged.id]
    if others:
        raise RolloverRefused(
            "intermediate %s is still in service beside %s (an overlap is open)"
            % (", ".join(others), ca.id),
            "move its devices (`cityedge keys rotate --select 'intermediate=%s'`) and run "
            "`cityedge ca retire` before the next rollover" % others[0])
    if staged is None:  # 3
        new_key = ec.generate_private_key(ec.SECP256R1())
        new_cert = _ca_cert(_next_subject(ca.cert), root.subject, new_key.public_key(),
                            root_key, days, 0, root_key.public_key())
        staged = Intermediate(key_id(new_key.public_key()), new_cert, new_key)
        write_atomic(ca_dir / NEXT_KEY, _key_pem(new_key, password), 0o600)
        write_atomic(ca_dir / NEXT_CERT, _cert_pem(new_cert), 0o644)
    old = ca.signer
    kept = _kept_entries(ca)  # 4
    crls = b"".join(ca.make_crl(kept if i is not staged else [], crl_validity_s, issuer=i)
                    for i in (old, staged))
    write_atomic(ca_dir / CRL_FILE, crls, 0o644)
    write_atomic(ca.broker_bundle_path,
                 _cert_pem(staged.cert) + _cert_pem(old.cert) + _cert_pem(root), 0o644)
    if before_switch is not None:
        before_switch()
    folder = ca_dir / INTERMEDIATES_DIR  # 5
    write_atomic(folder / (staged.id + ".key"), _key_pem(staged.key, password), 0o600)
    write_atomic(folder / (staged.id + ".crt"), _cert_pem(staged.cert), 0o644)
    write_atomic(ca_dir / CURRENT_FILE, (staged.id + "\n").encode(), 0o644)
    destroy_key(ca_dir / NEXT_KEY)
    remove(ca_dir / NEXT_CERT)
    return _result(old, staged, migrated)


def _result(old: Intermediate, new: Intermediate, migrated: bool) -> RolloverResult:
    cn = new.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return RolloverResult(old_id=old.id, new_id=new.id, new_subject=str(cn),
                          new_not_after=new.cert.not_valid_after_utc, migrated=migrated)
