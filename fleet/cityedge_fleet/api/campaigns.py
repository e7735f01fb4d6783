"""Key rotation campaigns and the key report over HTTP, for the security team (and admins)
only: preview a selector, create a campaign (over ``CampaignLimits.confirm_over`` devices
only with ``confirm``), read its progress, pause, resume or abort it; the fleet's key ages
and certificate expiries. ``fleet serve``'s campaign runner (``campaign_runner``) does the
work; every change is audited, a refusal too."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field
from sqlmodel import Session

from cityedge_fleet import audit, campaign_store, renewal
from cityedge_fleet.api.deps import SecurityDep
from cityedge_fleet.auth import client_address
from cityedge_fleet.campaign import LIMITS, CampaignError, SelectorError, parse_selector
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import ID_MAX, InputModel, utcnow

router = APIRouter(tags=["campaigns"])
CampaignId = Annotated[int, Path(ge=1, le=ID_MAX)]
PREVIEW_IDS_MAX = 100  # device ids a preview lists (the count is exact)


class CampaignSelect(InputModel):
    select: str = Field(min_length=1, max_length=LIMITS.selector_max_chars,
                        description="e.g. site=harbour,model=ce-air-1,key-age>60d (or all)")


class CampaignCreate(CampaignSelect):
    wave: int = Field(default=100, ge=1, le=LIMITS.wave_max,
                      description="devices per wave; the next starts when it is settled")
    max_failures: str = Field(default="5%", min_length=1, max_length=16,
                              description="failures that halt it when exceeded: 5 or 5%")
    confirm: bool = Field(default=False, description="required over %d devices"
                          % LIMITS.confirm_over)


class CampaignPreview(BaseModel):
    selector: str
    devices: int
    device_ids: list[str]  # the first PREVIEW_IDS_MAX
    left_out: dict[str, int]
    needs_confirm: bool


class CampaignFailure(BaseModel):
    device_id: str
    wave: int | None
    attempts: int
    reason: str


class CampaignDevice(BaseModel):
    device_id: str
    wave: int | None
    status: str  # waiting, active, offline, retry, done, failed
    attempts: int
    rotation: int | None  # its latest rotation (``GET /devices/{id}/rotations``)
    rotation_state: str | None  # pending, sent, csr-received, issued, proven, ...
    reason: str


class CampaignPublic(BaseModel):
    id: int
    selector: str
    state: str
    reason: str
    wave: int
    wave_size: int
    waves: int
    members: int
    max_failures: str
    allowed_failures: int
    created_by: str
    created_at: str
    updated_at: str
    counts: dict[str, int]
    rotations: dict[str, int]
    failed: list[CampaignFailure]
    offline: list[str]
    devices: list[CampaignDevice] | None = None  # with ``?devices=true``


class KeyReport(BaseModel):
    at: str
    summary: dict[str, int]
    devices: list[dict[str, Any]]
    campaigns: list[dict[str, Any]]


def _refused(session: Session, request: Request, who: str, action: str, target: str,
             e: Exception) -> HTTPException:
    session.rollback()
    audit.record(session, actor=who, action=action, outcome=audit.REFUSED, target=target,
                 source=client_address(request), detail={"why": str(e)})
    return HTTPException(getattr(e, "status", 422), str(e))


@router.post("/campaigns/preview", response_model=CampaignPreview, responses={422: {}})
def preview_campaign(body: CampaignSelect, request: Request, session: SessionDep,
                     who: SecurityDep) -> CampaignPreview:
    """The devices a campaign with this selector would rotate now, and the matching ones
    it would leave out (not active, no certificate, certificate expired), by reason."""
    try:
        seen = campaign_store.preview(session, parse_selector(body.select), utcnow())
    except SelectorError as e:
        raise _refused(session, request, who.name, "campaign.preview", "", e) from e
    return CampaignPreview(selector=seen.selector, devices=len(seen.selected),
                           device_ids=seen.selected[:PREVIEW_IDS_MAX], left_out=seen.left_out,
                           needs_confirm=len(seen.selected) > LIMITS.confirm_over)


@router.post("/campaigns", response_model=CampaignPublic, status_code=201,
             responses={409: {}, 422: {}})
def create_campaign(body: CampaignCreate, request: Request, session: SessionDep,
                    who: SecurityDep) -> CampaignPublic:
    """Create a rotation campaign: the selection is taken now, ``fleet serve`` starts it
    wave by wave (``GET /campaigns/{id}`` for its progress)."""
    try:
        camp, _seen = campaign_store.create(
            session, selector_text=body.select, wave_size=body.wave,
            max_failures=body.max_failures, by=who.name, confirmed=body.confirm)
        session.commit()
    except (SelectorError, CampaignError) as e:
        raise _refused(session, request, who.name, "campaign.create", body.select[:200],
                       e) from e
    _wake(request)
    return CampaignPublic.model_validate(campaign_store.status(session, camp.id or 0))


@router.get("/campaigns", response_model=list[CampaignPublic])
def list_campaigns(session: SessionDep, who: SecurityDep,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[CampaignPublic]:
    """The newest campaigns with their progress."""
    return [CampaignPublic.model_validate(campaign_store.status(session, c.id or 0))
            for c in campaign_store.campaigns(session, limit=limit)]


@router.get("/campaigns/{campaign_id}", response_model=CampaignPublic, responses={404: {}})
def get_campaign(campaign_id: CampaignId, session: SessionDep, who: SecurityDep,
                 devices: bool = False) -> CampaignPublic:
    """A campaign's progress: members by status, rotations by state, each failure's
    reason, the devices still offline; ``devices``: every device with its wave, status
    and rotation state."""
    try:
        return CampaignPublic.model_validate(campaign_store.status(session, campaign_id,
                                                                   devices=devices))
    except CampaignError as e:
        raise HTTPException(e.status, str(e)) from e


def _act(action: str, campaign_id: int, request: Request, session: Session,
         who: str) -> CampaignPublic:
    try:
        campaign_store.act(session, campaign_id, action, by=who)
        session.commit()
    except CampaignError as e:
        raise _refused(session, request, who, "campaign.%s" % action,
                       "campaign:%d" % campaign_id, e) from e
    _wake(request)
    return CampaignPublic.model_validate(campaign_store.status(session, campaign_id))


@router.post("/campaigns/{campaign_id}/pause", response_model=CampaignPublic,
             responses={404: {}, 409: {}})
def pause_campaign(campaign_id: CampaignId, request: Request, session: SessionDep,
                   who: SecurityDep) -> CampaignPublic:
    """Start nothing more until resumed (rotations under way go on)."""
    return _act("pause", campaign_id, request, session, who.name)


@router.post("/campaigns/{campaign_id}/resume", response_model=CampaignPublic,
             responses={404: {}, 409: {}})
def resume_campaign(campaign_id: CampaignId, request: Request, session: SessionDep,
                    who: SecurityDep) -> CampaignPublic:
    """Go on with a paused campaign."""
    return _act("resume", campaign_id, request, session, who.name)


@router.post("/campaigns/{campaign_id}/abort", response_model=CampaignPublic,
             responses={404: {}, 409: {}})
def abort_campaign(campaign_id: CampaignId, request: Request, session: SessionDep,
                   who: SecurityDep) -> CampaignPublic:
    """Stop for good: nothing more starts, rotations that have not reached their device
    are cancelled, the others finish."""
    return _act("abort", campaign_id, request, session, who.name)


@router.get("/keys/report", response_model=KeyReport)
def key_report(session: SessionDep, who: SecurityDep,
               everything: Annotated[bool, Query(alias="all")] = False,
               limit: Annotated[int, Query(ge=1, le=500)] = 500) -> KeyReport:
    """Key age and certificate expiry across the fleet: counts, the devices that need
    attention (overdue, expired, rotating, without a certificate; ``all``: every active
    device), at most ``limit``, and the newest campaigns."""
    got = renewal.key_report(session)
    devices = [d for d in got["devices"] if everything or d["status"] != "ok"][:limit]
    return KeyReport(at=got["at"], summary=got["summary"], devices=devices,
                     campaigns=got["campaigns"])


def _wake(request: Request) -> None:
    runner = getattr(request.app.state, "campaign_runner", None)
    if runner is not None:
        runner.wake()
