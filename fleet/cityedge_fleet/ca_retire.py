"""The intermediates in service, who depends on each, and retiring the old one after a
rollover (``cityedge ca status``, ``cityedge ca retire``; the rollover is ``ca_rollover``).

**Depends on an intermediate**: a device that is not retired (active, provisioned or
quarantined: a quarantined device may be reactivated) holding a certificate the
intermediate issued that is neither revoked nor expired (active, or suspended while its
device is quarantined). The issuer is ``credential.issuer`` (read from the certificate
for a row that has none).

``retire`` refuses while a device depends on an intermediate leaving service, or while
one of the fleet's own service certificates (the ingest's, the control's, the command
publisher's, from the settings) was issued by it: after retirement the broker refuses
every certificate of that intermediate, since no CRL of it is published any more
(Mosquitto refuses a client whose issuer has no CRL; taking it out of ``cafile`` alone
would not do: a client sends its intermediate, which chains to the root). Then, in
order: the certificate goes to ``retired/<id>.crt`` and leaves ``intermediates/``, the
key is overwritten and removed, ``broker-ca.pem`` and the CRL file are written without
it, the broker is reloaded, and the retirement is audited (``ca.retire``; a refusal
``ca.retire`` refused, with the devices). Cut short, it leaves the intermediate in
service or out of it, never a CA that cannot sign, and running it again finishes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from sqlmodel import Session, col, select

from cityedge_fleet import audit, revocation
from cityedge_fleet.ca import (
    INTERMEDIATES_DIR,
    RETIRED_DIR,
    CertificateAuthority,
    Intermediate,
    _cert_pem,
    issuer_id,
    issuer_id_of_pem,
)
from cityedge_fleet.ca_custody import TOKEN_SUFFIX, custody_of
from cityedge_fleet.ca_rollover import destroy_key, remove
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Credential, CredentialStatus, Device, DeviceState
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

LIST_MAX = 50  # devices a refusal names (the count is always given)


@dataclass(frozen=True)
class Dependent:
    device_id: str
    state: str
    serial: str
    not_after: dt.datetime


@dataclass(frozen=True)
class IntermediateStatus:
    id: str
    subject: str
    role: str  # "signing" or "overlap"
    not_before: dt.datetime
    not_after: dt.datetime
    devices: int  # devices that depend on it


class RetireRefused(UserError):
    """Something still depends on an intermediate that would leave service: ``devices``
    (all of them) and ``services`` (the fleet's own certificate files)."""

    def __init__(self, message: str, devices: list[Dependent], services: list[str],
                 old_id: str) -> None:
        hints = []
        if devices:
            shown = ", ".join(d.device_id for d in devices[:LIST_MAX])
            more = len(devices) - LIST_MAX
            hints.append("devices: %s%s; move them: cityedge keys rotate --select "
                         "'intermediate=%s'" % (shown, " and %d more" % more if more > 0
                                                else "", old_id))
        if services:
            hints.append("service certificates: %s; issue new ones with `cityedge ca "
                         "issue-service`" % ", ".join(services))
        super().__init__(message, "; ".join(hints))
        self.devices = devices
        self.services = services


def dependents(session: Session, inter_id: str, now: dt.datetime | None = None,
               intermediates: Sequence[Intermediate] = ()) -> list[Dependent]:
    """Devices that depend on intermediate ``inter_id`` (definition above), by id."""
    return by_issuer(session, now, intermediates).get(inter_id, [])


def _issuer_of(cred: Credential, intermediates: Sequence[Intermediate]) -> str:
    """The row's issuer, else the certificate's AuthorityKeyIdentifier, else the one of
    ``intermediates`` whose signature it carries; "" when none says."""
    named = cred.issuer or issuer_id_of_pem(cred.cert_pem)
    if named:
        return named
    try:
        cert = x509.load_pem_x509_certificate(cred.cert_pem.encode())
    except ValueError:
        return ""
    return next((i.id for i in intermediates if issued_by(cert, i)), "")


def by_issuer(session: Session, now: dt.datetime | None = None,
              intermediates: Sequence[Intermediate] = ()) -> dict[str, list[Dependent]]:
    """Every dependent device, keyed by the id of the intermediate it depends on ("" for
    a certificate whose issuer cannot be told)."""
    now = now or dt.datetime.now(dt.UTC)
    out: dict[str, list[Dependent]] = {}
    rows = session.exec(
        select(Credential, Device).join(Device, col(Device.id) == col(Credential.device_id))
        .where(col(Device.state) != DeviceState.retired,
               col(Credential.status).in_((CredentialStatus.active,
                                           CredentialStatus.suspended)),
               col(Credential.not_after) > now)
        .order_by(col(Credential.device_id), col(Credential.id))).all()
    for cred, device in rows:
        issuer = _issuer_of(cred, intermediates)
        deps = out.setdefault(issuer, [])
        if not deps or deps[-1].device_id != device.id:  # a device once per intermediate
            deps.append(Dependent(device.id, str(device.state), cred.serial, cred.not_after))
    return out


def status(session: Session, ca: CertificateAuthority) -> list[IntermediateStatus]:
    """The intermediates in service, the signing one first, with their dependents."""
    deps = by_issuer(session, intermediates=ca.intermediates)
    out = []
    for inter in ca.intermediates:
        out.append(IntermediateStatus(
            id=inter.id, subject=_cn(inter.cert),
            role="signing" if inter.id == ca.id else "overlap",
            not_before=inter.cert.not_valid_before_utc, not_after=inter.cert.not_valid_after_utc,
            devices=len(deps.get(inter.id, []))))
    return out


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _service_certs(settings: Settings) -> dict[str, Path]:
    """The fleet's own client certificates the broker checks (those configured)."""
    named = {"CITYEDGE_MQTT_CERT_FILE": settings.mqtt_cert_file,
             "CITYEDGE_BROKER_CONTROL_CERT_FILE": settings.broker_control_cert_file,
             "CITYEDGE_COMMANDS_CERT_FILE": settings.commands_cert_file}
    return {k: v for k, v in named.items() if v is not None}


def issued_by(cert: x509.Certificate, inter: Intermediate) -> bool:
    """True when ``inter`` issued ``cert``: by its AuthorityKeyIdentifier, or, for a
    certificate without one, by its name and signature."""
    named = issuer_id(cert)
    if named is not None:
        return named == inter.id
    try:
        cert.verify_directly_issued_by(inter.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _services_on(settings: Settings, leaving: list[Intermediate]) -> list[str]:
    out = []
    for variable, path in _service_certs(settings).items():
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue  # not readable here: the broker will say so, not this check
        if any(issued_by(cert, inter) for inter in leaving):
            out.append("%s (%s)" % (path, variable))
    return out


@dataclass(frozen=True)
class RetireResult:
    retired: list[str]
    signing: str
    broker_reloaded: bool


def retire(session: Session, ca_dir: Path, settings: Settings, *, by: str,
           source: str = "local") -> RetireResult:
    """Take every intermediate but the signing one out of service (module docstring)."""
    ca = CertificateAuthority(ca_dir, custody_of(settings))
    leaving = list(ca.overlap)
    if not leaving and not _unfinished(ca):
        raise UserError("nothing to retire: %s is the only intermediate in service" % ca.id,
                        "`cityedge ca rollover` makes a new one first")
    ids = {i.id for i in leaving}
    deps = by_issuer(session, intermediates=ca.intermediates)
    devices = [d for i in leaving for d in deps.get(i.id, [])]
    services = _services_on(settings, leaving)
    if devices or services:
        why = RetireRefused(
            "intermediate %s still has %d device(s) and %d service certificate(s) "
            "depending on it" % (", ".join(sorted(ids)), len(devices), len(services)),
            devices, services, sorted(ids)[0])
        audit.record(session, actor=by, action="ca.retire", outcome=audit.REFUSED,
                     target=",".join(sorted(ids)), source=source,
                     detail={"devices": len(devices),
                             "listed": [d.device_id for d in devices[:LIST_MAX]],
                             "services": services})
        raise why
    for inter in leaving:
        _take_out(ca_dir, inter)
    for key in _orphan_keys(ca_dir):  # a retirement cut short after the certificate went
        destroy_key(key)
    ca = CertificateAuthority(ca_dir, custody_of(settings))
    ca.write_broker_bundle()
    # re-signed for what is left: Mosquitto reloaded, a RabbitMQ cluster's nodes given it
    reloaded = revocation.publish_crl(session, ca, settings)
    audit.append(session, actor=by, action="ca.retire", outcome=audit.OK,
                 target=",".join(sorted(ids)), source=source,
                 detail={"signing": ca.id,
                         "not_after": {i.id: i.cert.not_valid_after_utc.isoformat()
                                       for i in leaving}})
    session.commit()
    return RetireResult(sorted(ids), ca.id, reloaded)


def _take_out(ca_dir: Path, inter: Intermediate) -> None:
    """The certificate kept in ``retired/``, then removed from ``intermediates/`` (a key
    without its certificate is out of service), then the key destroyed."""
    retired = ca_dir / RETIRED_DIR
    retired.mkdir(mode=0o755, exist_ok=True)
    write_atomic(retired / (inter.id + ".crt"), _cert_pem(inter.cert), 0o644)
    remove(ca_dir / INTERMEDIATES_DIR / (inter.id + ".crt"))
    destroy_key(ca_dir / INTERMEDIATES_DIR / (inter.id + ".key"))
    marker = ca_dir / INTERMEDIATES_DIR / (inter.id + TOKEN_SUFFIX)
    if marker.exists():  # held in a token: the token keeps the object until its own tool
        remove(marker)  # deletes it (docs/SECURITY_TEAM.md)


def _orphan_keys(ca_dir: Path) -> list[Path]:
    folder = ca_dir / INTERMEDIATES_DIR
    return [k for k in sorted([*folder.glob("*.key"), *folder.glob("*" + TOKEN_SUFFIX)])
            if not k.with_suffix(".crt").exists()]


def _unfinished(ca: CertificateAuthority) -> bool:
    """A retirement cut short: a key left behind, or the broker's files still naming an
    intermediate that left service."""
    try:
        bundle = ca.broker_bundle_path.read_text()
    except OSError:
        bundle = ""
    crls = ca.published_crls() or []
    return bool(_orphan_keys(ca.dir)) or bundle != ca.bundle_pem() or (
        {c.issuer for c in crls} != {i.cert.subject for i in ca.intermediates})
