"""OTA over HTTP: releases and campaigns for the release manager (and admins) only, and
the devices' downloads.

Release manager (``ReleaseManagerDep``; any other role 403, audited):

- ``PUT /ota/artifacts?sha256=HEX``: the artifact as the raw body, streamed to the store
  (``ota_store.ArtifactUpload``: hashed as it arrives, kept only under its announced
  digest, 413 past ``ota_artifact_max_bytes``);
- ``POST /ota/releases``: ``{"manifest": b64, "keys": b64}``, checked
  (``ota_store.create_release``) and stored; ``GET /ota/releases[/{id}]``;
- ``POST /ota/campaigns`` (release, selector, waves, success, max failures), ``GET
  /ota/campaigns[/{id}]``, ``POST /ota/campaigns/{id}/pause|resume|abort``.

Devices (no API token: the capability in the URL their signed ``update`` command names,
``ota_store.delivery``; an unknown one is 404, like a path that does not exist):
``GET /ota/d/{token}/manifest`` (the COSE_Sign1), ``.../keys`` (the release-key list) and
``.../artifact`` (one byte range per request: 206 with ``Content-Range``, 416 with
``Content-Range: bytes */size`` for a range ``ota.parse_range`` refuses, 200 without
``Range``). The fleet notes what each device fetched (the member's ``downloading`` /
``downloaded``). Any static server or CDN can serve the same three files instead: the
device trusts the signatures and the digests, not the server.

Each device has a budget on these three routes (``ratelimit.DownloadBudget``: requests
and bytes, from ``FleetLimits.ota_download_*``), charged after its capability is found
and before anything is served or noted: beyond it, 429 with ``Retry-After`` (whole
seconds), counted in ``cityedge_fleet_ota_download_throttled_total{what}``. So one device
(a stolen one, or a firmware bug re-fetching in a loop) slows only itself.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from pydantic import Field
from sqlmodel import Session

from cityedge_fleet import audit, instruments, ota, ota_store
from cityedge_fleet.auth import Principal, client_address, require_role
from cityedge_fleet.campaign import LIMITS as CLIMITS
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import ID_MAX, InputModel, Role

router = APIRouter(tags=["ota"])
ReleaseManagerDep = Annotated[Principal, Depends(require_role(Role.release_manager))]
Id = Annotated[int, PathParam(ge=1, le=ID_MAX)]
Token = Annotated[str, PathParam(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
B64_MAX = 12 * 1024  # characters of a base64 manifest or key list (8 KiB list + base64)


class ReleaseUpload(InputModel):
    manifest: str = Field(min_length=1, max_length=B64_MAX,
                          description="the signed manifest (COSE_Sign1), base64")
    keys: str = Field(min_length=1, max_length=B64_MAX,
                      description="the root-signed release-key list (COSE_Sign), base64")


class OtaCampaignCreate(InputModel):
    release: int = Field(ge=1, le=ID_MAX)
    select: str = Field(min_length=1, max_length=CLIMITS.selector_max_chars)
    waves: str = Field(default="100%", min_length=1, max_length=ota.LIMITS.waves_max_chars,
                       description="cumulative shares or counts, e.g. 1%,10%,100%")
    success: str = Field(default="90%", min_length=1, max_length=16,
                         description="share of a wave that must commit before the next")
    max_failures: str = Field(default="5%", min_length=1, max_length=16)
    confirm: bool = False


def _refused(session: Session, request: Request, who: str, action: str, target: str,
             e: ota_store.OtaError) -> HTTPException:
    session.rollback()
    audit.record(session, actor=who, action=action, outcome=audit.REFUSED, target=target,
                 source=client_address(request), detail={"why": str(e)})
    return HTTPException(e.status, str(e))


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ota_store.OtaError(422, "%s: not base64" % what) from e


@router.put("/ota/artifacts", responses={413: {}, 422: {}})
async def upload_artifact(request: Request, session: SessionDep, who: ReleaseManagerDep,
                          sha256: Annotated[str, Query(min_length=64, max_length=64)]
                          ) -> dict[str, Any]:
    """Store an artifact under its SHA-256 (the raw body, streamed; kept only if its
    digest is ``sha256``)."""
    try:
        up = ota_store.ArtifactUpload(request.app.state.settings, sha256)
        try:
            async for chunk in request.stream():
                up.feed(chunk)
        except ota_store.OtaError:
            raise
        except BaseException:
            up.abort()
            raise
        size = up.finish()
    except ota_store.OtaError as e:
        raise _refused(session, request, who.name, "ota.artifact.upload", sha256[:64],
                       e) from e
    audit.record(session, actor=who.name, action="ota.artifact.upload", outcome=audit.OK,
                 target=up.sha256_hex, source=client_address(request),
                 detail={"size": size})
    return {"sha256": up.sha256_hex, "size": size}


@router.post("/ota/releases", status_code=201, responses={409: {}, 422: {}, 503: {}})
def upload_release(body: ReleaseUpload, request: Request, session: SessionDep,
                   who: ReleaseManagerDep) -> dict[str, Any]:
    """Check a signed release against the root set and its stored artifact; store it."""
    try:
        rel = ota_store.create_release(session, request.app.state.settings,
                                       manifest=_b64(body.manifest, "manifest"),
                                       key_list=_b64(body.keys, "keys"), by=who.name)
        audit.append(session, actor=who.name, action="ota.release.upload",
                     outcome=audit.OK, target="release:%d" % (rel.id or 0),
                     source=client_address(request), detail=ota_store.release_public(rel))
        session.commit()
    except ota_store.OtaError as e:
        raise _refused(session, request, who.name, "ota.release.upload", "", e) from e
    return ota_store.release_public(rel)


@router.get("/ota/releases")
def list_releases(session: SessionDep, who: ReleaseManagerDep,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[dict[str, Any]]:
    return [ota_store.release_public(r) for r in ota_store.releases(session, limit=limit)]


@router.get("/ota/releases/{release_id}", responses={404: {}})
def get_release(release_id: Id, session: SessionDep, who: ReleaseManagerDep
                ) -> dict[str, Any]:
    try:
        return ota_store.release_public(ota_store.get_release(session, release_id))
    except ota_store.OtaError as e:
        raise HTTPException(e.status, str(e)) from e


@router.post("/ota/campaigns", status_code=201, responses={404: {}, 409: {}, 422: {}})
def create_campaign(body: OtaCampaignCreate, request: Request, session: SessionDep,
                    who: ReleaseManagerDep) -> dict[str, Any]:
    """Roll a release out in waves; ``fleet serve`` runs it."""
    try:
        camp = ota_store.create_campaign(
            session, request.app.state.settings, release_id=body.release,
            selector_text=body.select, waves=body.waves, success=body.success,
            max_failures=body.max_failures, by=who.name, confirmed=body.confirm)
        audit.append(session, actor=who.name, action="ota.campaign.create",
                     outcome=audit.OK, target="ota-campaign:%d" % (camp.id or 0),
                     source=client_address(request),
                     detail={"release": body.release, "selector": camp.selector,
                             "waves": camp.waves, "members": camp.members})
        session.commit()
    except ota_store.OtaError as e:
        raise _refused(session, request, who.name, "ota.campaign.create",
                       body.select[:200], e) from e
    _wake(request)
    return ota_store.status(session, camp.id or 0)


@router.get("/ota/campaigns")
def list_campaigns(session: SessionDep, who: ReleaseManagerDep,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[dict[str, Any]]:
    return [ota_store.status(session, c.id or 0)
            for c in ota_store.campaigns(session, limit=limit)]


@router.get("/ota/campaigns/{campaign_id}", responses={404: {}})
def get_campaign(campaign_id: Id, session: SessionDep, who: ReleaseManagerDep,
                 devices: bool = False) -> dict[str, Any]:
    try:
        return ota_store.status(session, campaign_id, devices=devices)
    except ota_store.OtaError as e:
        raise HTTPException(e.status, str(e)) from e


def _act(action: str, campaign_id: int, request: Request, session: Session,
         who: str) -> dict[str, Any]:
    try:
        ota_store.act(session, campaign_id, action, by=who)
        session.commit()
    except ota_store.OtaError as e:
        raise _refused(session, request, who, "ota.campaign.%s" % action,
                       "ota-campaign:%d" % campaign_id, e) from e
    _wake(request)
    return ota_store.status(session, campaign_id)


@router.post("/ota/campaigns/{campaign_id}/pause", responses={404: {}, 409: {}})
def pause_campaign(campaign_id: Id, request: Request, session: SessionDep,
                   who: ReleaseManagerDep) -> dict[str, Any]:
    return _act("pause", campaign_id, request, session, who.name)


@router.post("/ota/campaigns/{campaign_id}/resume", responses={404: {}, 409: {}})
def resume_campaign(campaign_id: Id, request: Request, session: SessionDep,
                    who: ReleaseManagerDep) -> dict[str, Any]:
    return _act("resume", campaign_id, request, session, who.name)


@router.post("/ota/campaigns/{campaign_id}/abort", responses={404: {}, 409: {}})
def abort_campaign(campaign_id: Id, request: Request, session: SessionDep,
                   who: ReleaseManagerDep) -> dict[str, Any]:
    return _act("abort", campaign_id, request, session, who.name)


def _wake(request: Request) -> None:
    runner = getattr(request.app.state, "campaign_runner", None)
    if runner is not None:
        runner.wake()


# ---------------------------------------------------------------------------- devices


def _delivery(session: Session, token: str) -> ota_store.Delivery:
    d = ota_store.delivery(session, token)
    if d is None:
        raise HTTPException(404, "Not Found")
    return d


def _admit(request: Request, d: ota_store.Delivery, nbytes: int) -> None:
    """Charge the device's download budget; 429 with ``Retry-After`` beyond it."""
    refused = request.app.state.download_budget.admit(d.device_id, nbytes)
    if refused is not None:
        instruments.OTA_THROTTLED.labels(what=refused.what).inc()
        raise HTTPException(429, "too many download %s from this device; retry after %d s"
                            % (refused.what, refused.retry_after_s),
                            headers={"Retry-After": str(refused.retry_after_s)})
    instruments.OTA_SERVED_BYTES.inc(nbytes)


@router.get("/ota/d/{token}/manifest", responses={404: {}, 429: {}})
def device_manifest(token: Token, request: Request, session: SessionDep) -> Response:
    """The signed manifest of the release this capability was given for."""
    d = _delivery(session, token)
    _admit(request, d, len(d.release.manifest))
    ota_store.note_progress(session, d, ota.MemberStatus.downloading)
    return Response(d.release.manifest, media_type="application/cose")


@router.get("/ota/d/{token}/keys", responses={404: {}, 429: {}})
def device_keys(token: Token, request: Request, session: SessionDep) -> Response:
    """The root-signed release-key list the manifest's key is certified by."""
    d = _delivery(session, token)
    _admit(request, d, len(d.release.key_list))
    return Response(d.release.key_list, media_type="application/cose")


@router.get("/ota/d/{token}/artifact", responses={206: {}, 404: {}, 416: {}, 429: {}})
def device_artifact(token: Token, request: Request, session: SessionDep) -> Response:
    """The artifact, whole or one byte range."""
    d = _delivery(session, token)
    rel = d.release
    path = ota_store.artifact_path(request.app.state.settings, rel.sha256)
    size = rel.size
    headers = {"Accept-Ranges": "bytes", "ETag": '"%s"' % rel.sha256}
    try:
        got = ota.parse_range(request.headers.get("range"), size)
    except ota.RangeRefused as e:
        _admit(request, d, 0)  # a refused range costs a request
        return Response(str(e), status_code=416, media_type="text/plain",
                        headers={**headers, "Content-Range": "bytes */%d" % size})
    first, last = got if got is not None else (0, size - 1)
    _admit(request, d, last - first + 1)
    if last == size - 1:
        ota_store.note_progress(session, d, ota.MemberStatus.downloaded)
    else:
        ota_store.note_progress(session, d, ota.MemberStatus.downloading)
    headers["Content-Length"] = str(last - first + 1)
    if got is not None:
        headers["Content-Range"] = "bytes %d-%d/%d" % (first, last, size)
    return StreamingResponse(ota_store.read_chunks(path, first, last, ota.LIMITS.chunk_bytes),
                             status_code=206 if got is not None else 200,
                             media_type="application/octet-stream", headers=headers)
