"""Dependencies shared by the routers: settings, the CA, role aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from cityedge_fleet.auth import Principal, require_role
from cityedge_fleet.ca import CaError, CertificateAuthority
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Role


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_ca(request: Request) -> CertificateAuthority:
    ca: CertificateAuthority | None = getattr(request.app.state, "ca", None)
    if ca is None:
        try:
            ca = CertificateAuthority(request.app.state.settings.ca_dir)
        except CaError as e:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e
        request.app.state.ca = ca
    return ca


SettingsDep = Annotated[Settings, Depends(get_settings)]
CaDep = Annotated[CertificateAuthority, Depends(get_ca)]

R = Role
AdminDep = Annotated[Principal, Depends(require_role())]
TechnicianDep = Annotated[Principal, Depends(require_role(R.technician))]
SecurityDep = Annotated[Principal, Depends(require_role(R.security))]
ReaderDep = Annotated[Principal, Depends(require_role(
    R.viewer, R.technician, R.security, R.release_manager))]
