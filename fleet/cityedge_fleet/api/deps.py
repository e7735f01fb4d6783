"""Dependencies shared by the routers: settings, the CA, role aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlmodel import Session

from cityedge_core.errors import LocalError
from cityedge_fleet import audit
from cityedge_fleet.auth import Principal, require_role
from cityedge_fleet.broker_control import BrokerUnavailable, CommandFailed
from cityedge_fleet.broker_sync import BrokerAccess
from cityedge_fleet.ca import CaError, CertificateAuthority, load_current
from cityedge_fleet.ca_custody import custody_of
from cityedge_fleet.command_key import trust_store
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Role
from cityedge_host.crypto import EcSigner


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_ca(request: Request) -> CertificateAuthority:
    """The CA directory's CA as it is now: after a rollover, the new intermediate signs
    (``ca.load_current`` loads it again only when the directory changed)."""
    try:
        settings = request.app.state.settings
        return load_current(settings.ca_dir, custody_of(settings))
    except CaError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e


def get_broker_access(request: Request) -> BrokerAccess:
    access: BrokerAccess = request.app.state.broker_access
    return access


def get_command_key(request: Request) -> EcSigner:
    """The fleet's command key (``command_key.KeyFile``): the file's key now, 503 if the
    file became missing or unsafe since the start."""
    try:
        key: EcSigner = request.app.state.command_key.current()
    except LocalError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e
    return key


def get_trust_store(request: Request) -> list[str]:
    """The fleet public keys a device trusts for commands (``command_key.trust_store``)."""
    return trust_store(get_command_key(request))


SettingsDep = Annotated[Settings, Depends(get_settings)]
CommandKeyDep = Annotated[EcSigner, Depends(get_command_key)]
TrustStoreDep = Annotated[list[str], Depends(get_trust_store)]
BrokerDep = Annotated[BrokerAccess, Depends(get_broker_access)]
CaDep = Annotated[CertificateAuthority, Depends(get_ca)]

R = Role
AdminDep = Annotated[Principal, Depends(require_role())]
TechnicianDep = Annotated[Principal, Depends(require_role(R.technician))]
SecurityDep = Annotated[Principal, Depends(require_role(R.security))]
ReaderDep = Annotated[Principal, Depends(require_role(
    R.viewer, R.technician, R.security, R.release_manager))]


def grant_before_commit(session: Session, access: BrokerAccess, device_id: str, *,
                        actor: str, source: str) -> None:
    """Enrollment's broker grant, inside its transaction (``broker_sync``): a broker that
    cannot be told rolls the enrollment back (its token or claim stays unused), audits it
    and answers 503."""
    try:
        access.grant(device_id)
    except (BrokerUnavailable, CommandFailed) as e:
        session.rollback()
        audit.record(session, actor=actor, action="enroll", outcome=audit.ERROR,
                     target=device_id, source=source, detail={"why": "broker: %s" % e})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the broker cannot be reached to let the device in; nothing "
                            "was enrolled") from e
