"""Enrollment over HTTP: technicians issue tokens and upload manifests; devices enroll."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response

from cityedge_fleet import audit, enrollment, registry
from cityedge_fleet.api.deps import (
    BrokerDep,
    CaDep,
    SettingsDep,
    TechnicianDep,
    TrustStoreDep,
    grant_before_commit,
)
from cityedge_fleet.api.errors import invalid
from cityedge_fleet.auth import client_address, require_sites
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import (
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollRequest,
    EnrollResponse,
    FleetKeys,
    ManifestAccepted,
    ManifestUpload,
)

router = APIRouter(tags=["enrollment"])


TOKEN_BODY = {"serial": "$response.body#/serial", "token": "$response.body#/token"}


@router.post("/enrollment/tokens", response_model=EnrollmentTokenCreated, status_code=201,
             responses={201: {"links": {
                 "Enroll": {"operationRef": "#/paths/~1enroll/post", "requestBody": TOKEN_BODY},
                 "EnrollWithTicket": {"operationRef": "#/paths/~1enroll~1ticket/post",
                                      "requestBody": TOKEN_BODY}}}})
def create_enrollment_token(body: EnrollmentTokenCreate, request: Request,
                            session: SessionDep, settings: SettingsDep,
                            who: TechnicianDep) -> EnrollmentTokenCreated:
    """A one-time token for ``serial``. A technician token scoped to sites gets one only
    for a serial registered at one of them (the same refusal for an unregistered serial
    and for one elsewhere); an unscoped one for any serial."""
    lim = settings.limits
    ttl = body.ttl_s or lim.enroll_token_ttl_s
    if ttl > lim.enroll_token_max_ttl_s:
        raise invalid(["body", "ttl_s"], "ttl_s may be at most %d" % lim.enroll_token_max_ttl_s)
    if who.sites:
        device = registry.get_by_serial(session, body.serial)
        require_sites(request, session, who, [device.site if device is not None else None],
                      action="enroll.token", target=body.serial,
                      refusal="serial %s is not registered at a site of this token"
                      % body.serial)
    row, token = enrollment.issue_token(session, serial=body.serial, ttl_s=ttl,
                                        created_by=who.name)
    audit.append(session, actor=who.name, action="enroll.token", outcome=audit.OK,
                 target=body.serial, source=client_address(request),
                 detail={"ttl_s": ttl, "id": row.id, **who.scope_detail()})
    session.commit()
    return EnrollmentTokenCreated(serial=body.serial, token=token, expires_at=row.expires_at)


@router.post("/enrollment/manifests", response_model=ManifestAccepted, status_code=201,
             responses={409: {}, 422: {}})
def upload_manifest(body: ManifestUpload, request: Request, session: SessionDep,
                    settings: SettingsDep, who: TechnicianDep) -> ManifestAccepted:
    """Allow-list a vendor delivery: each serial with the SHA-256 of its claim secret."""
    lim = settings.limits
    if len(body.devices) > lim.manifest_max_serials:
        raise HTTPException(422, "a manifest may list at most %d serials"
                            % lim.manifest_max_serials)
    claims: dict[str, str] = {}
    for entry in body.devices:
        if claims.setdefault(entry.serial, entry.claim_sha256) != entry.claim_sha256:
            raise HTTPException(422, "serial %s is listed twice with different claims"
                                % entry.serial)
    try:
        added, already = enrollment.allow_serials(session, manifest=body.manifest,
                                                  claims=claims, added_by=who.name)
    except enrollment.ClaimConflict as e:
        session.rollback()
        audit.record(session, actor=who.name, action="enroll.manifest",
                     outcome=audit.REFUSED, target=body.manifest,
                     source=client_address(request), detail={"why": str(e)})
        raise HTTPException(409, str(e)) from e
    audit.append(session, actor=who.name, action="enroll.manifest", outcome=audit.OK,
                 target=body.manifest, source=client_address(request),
                 detail={"added": added, "already_listed": already})
    session.commit()
    return ManifestAccepted(manifest=body.manifest, added=added, already_listed=already)


@router.post("/enroll", response_model=EnrollResponse,
             responses={403: {}, 409: {}, 422: {}, 429: {}, 503: {}})
def enroll(body: EnrollRequest, request: Request, session: SessionDep, settings: SettingsDep,
           ca: CaDep, broker: BrokerDep, fleet_keys: TrustStoreDep) -> EnrollResponse:
    """A device sends its serial, its enrollment token (or, allow-listed, its claim
    secret) and a CSR. Every refusal before the gate is passed is the same 403
    (``enrollment.REFUSED``); the audit log keeps the reason."""
    source = client_address(request)
    if not request.app.state.enroll_limiter.take(source):
        raise HTTPException(429, "too many enrollment attempts; retry later")
    try:
        device, cred, response, gate = enrollment.enroll(session, ca=ca, settings=settings,
                                                         req=body, fleet_keys=fleet_keys)
    except enrollment.EnrollmentRefused as e:
        session.rollback()
        audit.record(session, actor="device:%s" % body.serial, action="enroll",
                     outcome=audit.REFUSED, target=body.serial, source=source,
                     detail={"why": e.why, "code": e.code, "status": e.status})
        raise HTTPException(e.status, e.public) from e
    grant_before_commit(session, broker, device.id, actor="device:%s" % body.serial,
                        source=source)
    audit.append(session, actor="device:%s" % body.serial, action="enroll", outcome=audit.OK,
                 target=device.id, source=source,
                 detail={"gate": gate, "cert_serial": cred.serial, "kid": cred.kid,
                         "trust_version": device.trust_version})
    session.commit()
    return response


@router.get("/ca/crl", response_class=PlainTextResponse, tags=["ca"])
def get_crl(ca: CaDep) -> Response:
    """The current CRL (PEM), the same file the broker loads."""
    try:
        data = ca.crl_path.read_bytes()
    except OSError as e:
        raise HTTPException(503, "no CRL published yet") from e
    return Response(data, media_type="application/x-pem-file")


@router.get("/ca/bundle", response_class=PlainTextResponse, tags=["ca"])
def get_bundle(ca: CaDep) -> Response:
    """Every intermediate in service + the root (PEM): what the broker trusts."""
    return Response(ca.bundle_pem(), media_type="application/x-pem-file")


@router.get("/ca/fleet-keys", response_model=FleetKeys, tags=["ca"])
def get_fleet_keys(fleet_keys: TrustStoreDep) -> FleetKeys:
    """The fleet public keys devices trust for commands (public, as the CA certificates
    are): what enrollment hands a device, for a technician who provisions offline."""
    return FleetKeys(fleet_keys=fleet_keys)
