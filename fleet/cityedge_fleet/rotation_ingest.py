"""The ingest's half of key rotation: a device's ``up/csr`` message checked and answered
with a certificate, and the first batch signed with the new key turned into the old
certificate's revocation. Protocol: ``cityedge_core.rotation``; states:
``cityedge_fleet.rotation``.

``RotationDesk.take_csr`` applies, in order (the first failure refuses; every refusal is
an ``IngestEvent`` and an audit row ``rotation.csr`` with outcome ``refused``; a taken one
is audited as its rotation's ``rotation.csr-received`` and ``rotation.issued``):

====  ===============================================================  ==================  ======
 #    rule                                                             refused as          fails
====  ===============================================================  ==================  ======
 1    size and shape (``rotation_decode.decode_csr_message``)          ``csr_malformed``
 2    the topic's device is the proof's device                         ``csr_wrong_device``
 3    the proof's kid names a credential of that device that is        ``csr_bad_proof``
      *active* (not suspended, not revoked), and the proof verifies
      with it
 4    a rotation of this device is ``sent`` with that rotation id      ``csr_no_rotation``
 5    the device is active (not quarantined, not retired)              ``csr_not_active``  R
 6    the CSR: self-signature, P-256, CN = the device (``ca``)         ``csr_bad_csr``     R
 7    its key is no key the fleet knows (its kid is unique)            ``csr_key_known``   R
 8    the proof's hash is the CSR's SHA-256                            ``csr_mismatch``    R
====  ===============================================================  ==================  ======

R: the rotation fails with that reason (the device's current key vouched for the message:
its own fault, and waiting would not fix it); before rule 4 nothing of the rotation moves,
so a message nobody vouched for cannot end a rotation. Then: the CA issues the certificate,
a second *active* credential is stored (the old one stays active: the overlap), nothing is
granted at the broker (the same CN, the same role), and ``install-cert`` is queued
(``csr-received``, then ``issued``).

``batch_taken`` is told of every batch the ingest stores with the key that signed it. The
first time a worker sees a kid it asks the database whether that kid is the new key of an
``issued`` rotation (or of a failed one that issued it); if so the rotation is ``proven``,
every other credential of the device is revoked (the old key's, and one an earlier
rotation issued but the device never installed), ``erase-key`` names the key that signed
the proof (the device's current key when it asked), and and the CRL is due (``crl_due``: the
ingest re-signs it and reloads the broker after its commit). A kid seen once is not asked
about again (one query per key per worker).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from cityedge_core import cose, csr, rotation_decode
from cityedge_core import rotation as corerot
from cityedge_core.errors import LocalError, PeerError, SignatureError
from cityedge_fleet import audit, command_queue, registry, revocation, rotation
from cityedge_fleet.ca import CertificateAuthority, CsrError, load_current
from cityedge_fleet.config import Settings
from cityedge_fleet.models import (
    Credential,
    CredentialStatus,
    Device,
    DeviceState,
    KeyRotation,
    RotationState,
)
from cityedge_host.crypto import EcSigner, EcVerifier

log = logging.getLogger(__name__)
CSR_TAKEN = "csr_taken"
CSR_MALFORMED = "csr_malformed"
CSR_WRONG_DEVICE = "csr_wrong_device"
CSR_BAD_PROOF = "csr_bad_proof"
CSR_NO_ROTATION = "csr_no_rotation"
CSR_NOT_ACTIVE = "csr_not_active"
CSR_BAD_CSR = "csr_bad_csr"
CSR_KEY_KNOWN = "csr_key_known"
CSR_MISMATCH = "csr_mismatch"
CSR_UNAVAILABLE = "csr_unavailable"  # the fleet cannot issue now (no CA or command key)
S = RotationState


@dataclass(frozen=True)
class CsrOutcome:
    status: str
    detail: str = ""
    rotation: int | None = None


class RotationDesk:
    """The CA and the command key the ingest issues and commands with (loaded from the
    settings on first use: a worker that never sees a rotation never reads them)."""

    def __init__(self, settings: Settings, ca: CertificateAuthority | None = None,
                 signer: EcSigner | None = None) -> None:
        self.settings = settings
        self._ca = ca
        self._signer = signer
        self._key_file: Any = None  # command_key.KeyFile once loaded from the settings
        self.seen_kids: set[bytes] = set()  # kids known not to await a proof (this worker)
        self.crl_due = False
        self.steps = 0  # CSRs taken and rotations proven (the ingest resets it per part)

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:  # the directory's CA now (a rollover switches it)
            from cityedge_fleet.ca_custody import custody_of

            return load_current(self.settings.ca_dir, custody_of(self.settings))
        return self._ca

    @property
    def signer(self) -> EcSigner:
        if self._signer is None:
            from cityedge_fleet import command_key

            self._key_file = command_key.key_file(self.settings)
            self._signer = self._key_file.current()
        elif self._key_file is not None:  # follows `keys rotate-command-key --switch`
            self._signer = self._key_file.current()
        return self._signer

    # -- the CSR ------------------------------------------------------------------------

    def take_csr(self, session: Session, publisher_id: str, payload: bytes,
                 audits: list[dict[str, Any]]) -> CsrOutcome:
        """The rules above; the caller records the outcome's event and commits."""
        outcome = self._check_and_issue(session, publisher_id, payload, audits)
        if outcome.status != CSR_TAKEN:  # a taken one is audited by its transitions
            audits.append({"actor": "device:%s" % publisher_id, "action": "rotation.csr",
                           "outcome": audit.REFUSED, "target": publisher_id,
                           "detail": {"status": outcome.status, "rotation": outcome.rotation,
                                      "why": outcome.detail}})
        return outcome

    def _check_and_issue(self, session: Session, device_id: str, payload: bytes,
                         audits: list[dict[str, Any]]) -> CsrOutcome:
        try:
            self.ca, self.signer  # noqa: B018  (loaded before anything moves)
        except LocalError as e:
            log.error("cannot take a CSR: %s", e)
            return CsrOutcome(CSR_UNAVAILABLE, "the fleet cannot issue now: %s" % e)
        try:  # 1
            msg = rotation_decode.decode_csr_message(payload)
        except PeerError as e:
            return CsrOutcome(CSR_MALFORMED, str(e))
        if msg.device != device_id:  # 2
            return CsrOutcome(CSR_WRONG_DEVICE, "the proof names %s" % msg.device)
        cred = session.exec(select(Credential).where(
            col(Credential.kid) == msg.kid.hex())).first()  # 3
        if cred is None or cred.device_id != device_id:
            return CsrOutcome(CSR_BAD_PROOF, "the proof's key %s is not a key of this device"
                              % msg.kid.hex())
        if cred.status != CredentialStatus.active:
            return CsrOutcome(CSR_BAD_PROOF, "the proof's key %s is %s"
                              % (msg.kid.hex(), cred.status))
        try:
            msg.verify(EcVerifier.from_sec1(bytes.fromhex(cred.public_key)))
        except SignatureError as e:
            return CsrOutcome(CSR_BAD_PROOF, "the proof does not verify: %s" % e)
        rot = rotation.open_rotation(session, device_id, lock=True)  # 4
        if rot is None or rot.id != msg.rotation_id or rot.state != S.sent:
            have = "none open" if rot is None else "%d is %s" % (rot.id or 0, rot.state)
            return CsrOutcome(CSR_NO_ROTATION, "rotation %d is not waiting for a CSR (%s)"
                              % (msg.rotation_id, have), msg.rotation_id)
        device = session.get(Device, device_id)
        failure = self._check_request(session, device, msg)  # 5-8
        if failure is not None:
            rotation.move(session, rot, rotation.FAIL, actor="ingest", audits=audits,
                          reason="%s: %s" % (failure.status, failure.detail))
            return CsrOutcome(failure.status, failure.detail, rot.id)
        assert device is not None  # _check_request refuses a missing device
        self._issue(session, rot, msg, audits)
        self.steps += 1
        return CsrOutcome(CSR_TAKEN, "issued %s" % rot.new_serial, rot.id)

    def _check_request(self, session: Session, device: Device | None,
                       msg: rotation_decode.CsrMessage) -> CsrOutcome | None:
        if device is None or device.state != DeviceState.active:  # 5
            return CsrOutcome(CSR_NOT_ACTIVE, "device is %s"
                              % (device.state if device else "gone"))
        try:  # 6
            req = self.ca.check_csr(csr.pem("CERTIFICATE REQUEST", msg.csr), device.id)
        except CsrError as e:
            return CsrOutcome(CSR_BAD_CSR, str(e))
        sec1 = req.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
        kid = cose.kid_for_public_key(sec1)
        if session.exec(select(Credential).where(col(Credential.kid) == kid.hex())).first():
            return CsrOutcome(CSR_KEY_KNOWN, "the new key %s is a key the fleet knows"
                              % kid.hex())  # 7
        if not msg.digest_matches():  # 8
            return CsrOutcome(CSR_MISMATCH, "the proof names another CSR")
        return None

    def _issue(self, session: Session, rot: KeyRotation, msg: rotation_decode.CsrMessage,
               audits: list[dict[str, Any]]) -> None:
        rotation.move(session, rot, rotation.CSR_TAKEN, actor="ingest", audits=audits,
                      detail={"kid": msg.kid.hex()})
        device_id = rot.device_id
        lim = self.settings.limits
        ca = self.ca  # one CA for the certificate and the issuer it records
        cert = ca.sign_csr(csr.pem("CERTIFICATE REQUEST", msg.csr), device_id,
                           days=lim.cert_validity_days)
        sec1 = cert.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
        new_kid = cose.kid_for_public_key(sec1).hex()
        registry.add_credential(session, credential=Credential(
            device_id=device_id, serial="%x" % cert.serial_number, kid=new_kid,
            public_key=sec1.hex(), not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc, issuer=ca.id,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode()))
        der = cert.public_bytes(serialization.Encoding.DER)
        cmd = command_queue.queue(
            session, signer=self.signer, device_id=device_id, name=corerot.INSTALL_CERT,
            args={"rotation": rot.id, "cert_sha256": hashlib.sha256(der).hexdigest()},
            wire_args={corerot.A_ROTATION: rot.id, corerot.A_CERT: der},
            expires_in_s=None, created_by="ingest", lim=lim)
        rot.new_kid = new_kid
        # the key being replaced is the one that signed the proof: the key the device
        # holds as current (a certificate issued by an earlier rotation that never got
        # installed is active too, but is not on the device)
        rot.old_kid = msg.kid.hex()
        rot.new_serial = "%x" % cert.serial_number
        rot.csr_sha256 = msg.csr_sha256.hex()
        rot.install_command_id = cmd.id
        rotation.move(session, rot, rotation.ISSUED, actor="ingest", audits=audits,
                      detail={"new_kid": new_kid, "serial": rot.new_serial,
                              "command": cmd.id, "seq": cmd.seq})

    # -- the first batch under the new key -----------------------------------------------

    def batch_taken(self, session: Session, device_id: str, kid: bytes, seq: int,
                    audits: list[dict[str, Any]]) -> bool:
        """A batch of ``device_id`` signed with ``kid`` was stored: True when it proved a
        rotation (the old credential is then revoked and erase-key queued)."""
        if kid in self.seen_kids:
            return False
        rot = session.exec(select(KeyRotation).where(
            col(KeyRotation.device_id) == device_id, col(KeyRotation.new_kid) == kid.hex(),
            col(KeyRotation.state).in_((S.issued, S.failed))).with_for_update()).first()
        if rot is None:
            self.seen_kids.add(kid)
            return False
        try:
            self.signer  # noqa: B018  (loaded before anything moves)
        except LocalError as e:
            log.error("rotation %d proven but not recorded: %s", rot.id or 0, e)
            return False  # asked again at the next batch
        rot.proven_seq = seq
        rotation.move(session, rot, rotation.NEW_KEY_SEEN, actor="ingest", audits=audits,
                      detail={"new_kid": rot.new_kid, "seq": seq})
        # every other certificate of the device is superseded: the old key, and one an
        # earlier rotation issued that the device never used
        for old in session.exec(select(Credential).where(
                col(Credential.device_id) == device_id,
                col(Credential.kid) != rot.new_kid,
                col(Credential.status) != CredentialStatus.revoked)).all():
            registry.revoke_credential(session, credential=old)
            audits.append({"actor": "ingest", "action": "credential.revoke",
                           "outcome": audit.OK, "target": device_id,
                           "detail": {"serial": old.serial, "kid": old.kid,
                                      "rotation": rot.id, "why": "superseded"}})
        cmd = command_queue.queue(
            session, signer=self.signer, device_id=device_id, name=corerot.ERASE_KEY,
            args={"rotation": rot.id, "old_kid": rot.old_kid},
            wire_args={corerot.A_ROTATION: rot.id,
                       corerot.A_OLD_KID: bytes.fromhex(rot.old_kid)},
            expires_in_s=None, created_by="ingest", lim=self.settings.limits)
        rot.erase_command_id = cmd.id
        session.add(rot)
        self.seen_kids.add(kid)
        self.crl_due = True
        self.steps += 1
        return True

    def publish_crl(self, session: Session) -> None:
        """After the commit that revoked old certificates: re-sign the CRL, reload the
        broker (a failure is logged; ``fleet serve``'s reconciler re-signs it later)."""
        if not self.crl_due:
            return
        self.crl_due = False
        try:
            revocation.publish_crl(session, self.ca, self.settings)
        except OSError as e:
            log.error("CRL not re-signed after a rotation: %s", e)
