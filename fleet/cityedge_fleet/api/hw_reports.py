"""Hardware reports over HTTP: the security team registers device models to vendors;
vendors upload the reports of ``cityedge hw check`` for their own models; the security
team reads them all (``hw_access`` has the rule). Every upload is audited, refused or not.

``POST /hw/reports`` takes the report's JSON as it is (the body, at most
``FleetLimits.hw_report_max_bytes``): the fleet keeps those bytes and their SHA-256, so
the report it shows (``GET /hw/reports/{id}/raw``) is the one the vendor's tool wrote.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from sqlmodel import Session

from cityedge_fleet import audit, hw_access, hw_report_check, hw_report_store
from cityedge_fleet.api.deps import SecurityDep, SettingsDep
from cityedge_fleet.api.errors import invalid
from cityedge_fleet.auth import Principal, client_address, require_role
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import (
    ID_MAX,
    TEXT_MAX,
    HwReport,
    HwReportDetail,
    HwReportPublic,
    HwReportsPublic,
    ModelRegistration,
    ModelRegistrationCreate,
    ModelRegistrationPublic,
)

router = APIRouter(prefix="/hw", tags=["hardware"])
HwDep = Annotated[Principal, Depends(require_role(*hw_access.REPORT_ROLES))]
PAGE_MAX = 500  # rows: FleetLimits.page_max (a Query bound must be a constant)
AUDIT_PROBLEMS_MAX = 10  # problems of a refused report the audit row keeps
NOT_YOURS = "device model %s is not registered to your vendor"
REPORT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "the JSON report `cityedge hw check` wrote "
    "(\"schema\": \"cityedge-hw-report/1\"), unchanged"}}}}}


async def _body(request: Request) -> bytes:
    """The request's bytes (``BodyLimits`` bounds them), read in the event loop so that the
    route itself, which uses the database, runs in the thread pool as every other does;
    declared after the caller's role, so a request without one is refused unread."""
    return await request.body()


BodyDep = Annotated[bytes, Depends(_body)]


def _deny(request: Request, session: Session, who: Principal, *, action: str, target: str,
          why: str) -> HTTPException:
    """A 403 for a model or report that is not the caller's, audited at once."""
    audit.record(session, actor=who.name, action=action, outcome=audit.DENIED, target=target,
                 source=client_address(request), detail={"why": why, "vendor": who.vendor})
    return HTTPException(status.HTTP_403_FORBIDDEN, why)


def _public(row: HwReport) -> HwReportPublic:
    return HwReportPublic.model_validate(row)


@router.post("/models", response_model=ModelRegistrationPublic, status_code=201,
             responses={200: {"model": ModelRegistrationPublic}, 409: {}})
def register_model(body: ModelRegistrationCreate, request: Request, response: Response,
                   session: SessionDep, who: SecurityDep) -> ModelRegistration:
    """Register a device model (as devices name it in ``model``) to its vendor. The same
    registration again answers 200; a model registered to another vendor, 409."""
    try:
        row, created = hw_report_store.register_model(session, name=body.name,
                                                      vendor=body.vendor,
                                                      registered_by=who.name)
    except hw_report_store.ModelTaken as e:
        session.rollback()
        audit.record(session, actor=who.name, action="hw.model.register",
                     outcome=audit.REFUSED, target=body.name, source=client_address(request),
                     detail={"vendor": body.vendor, "why": str(e)})
        raise HTTPException(409, str(e)) from e
    if created:
        audit.append(session, actor=who.name, action="hw.model.register", outcome=audit.OK,
                     target=body.name, source=client_address(request),
                     detail={"vendor": body.vendor})
        session.commit()
        session.refresh(row)
    else:
        response.status_code = 200
    return row


@router.get("/models", response_model=list[ModelRegistrationPublic])
def list_models(session: SessionDep, who: HwDep) -> Any:
    """The registered models: a vendor sees its own."""
    return hw_report_store.list_models(session, vendor=hw_access.vendor_scope(who))


@router.post("/reports", response_model=HwReportPublic, status_code=201,
             openapi_extra=REPORT_BODY, responses={403: {}, 413: {}, 422: {}})
def upload_report(who: HwDep, data: BodyDep, request: Request, session: SessionDep,
                  settings: SettingsDep) -> HwReportPublic:
    """Upload a hardware report for a registered model (a vendor: its own models only).
    The fleet recomputes ``met`` and refuses a report whose summary disagrees."""
    source = client_address(request)
    try:
        report = hw_report_check.read_report(data, settings.limits)
    except hw_report_check.HwReportRefused as e:
        raise _refuse_report(session, who, source, "", e) from e
    model = report.device.model
    registration = session.get(ModelRegistration, model)
    if registration is None and hw_access.sees_every_vendor(who):
        why = "device model %s is not registered: register it first (POST /hw/models)" % model
        audit.record(session, actor=who.name, action="hw.report.upload",
                     outcome=audit.REFUSED, target=model, source=source,
                     detail={"code": "unregistered", "problems": [why]})
        raise invalid(["body", "device", "model"], why)
    if not hw_access.may_use(who, registration):
        raise _deny(request, session, who, action="hw.report.upload", target=model,
                    why=NOT_YOURS % model)
    assert registration is not None  # may_use made sure
    try:
        accepted = hw_report_check.accept_report(report)
    except hw_report_check.HwReportRefused as e:
        raise _refuse_report(session, who, source, model, e) from e
    sha256 = hashlib.sha256(data).hexdigest()
    row = hw_report_store.add_report(session, registration=registration, accepted=accepted,
                                     data=data, sha256=sha256, uploaded_by=who.name)
    audit.append(session, actor=who.name, action="hw.report.upload", outcome=audit.OK,
                 target=model, source=source,
                 detail={"id": row.id, "profile": row.profile, "met": row.met,
                         "sha256": sha256, "size": len(data)})
    session.commit()
    session.refresh(row)
    return _public(row)


def _refuse_report(session: Session, who: Principal, source: str, model: str,
                   e: hw_report_check.HwReportRefused) -> HTTPException:
    """A report the fleet refuses: audited at once (rule and problems), 422 naming each."""
    session.rollback()
    audit.record(session, actor=who.name, action="hw.report.upload", outcome=audit.REFUSED,
                 target=model, source=source,
                 detail={"code": e.code, "problems": e.problems[:AUDIT_PROBLEMS_MAX]})
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         [{"loc": ["body"], "msg": problem, "type": "value_error"}
                          for problem in e.problems])


@router.get("/reports", response_model=HwReportsPublic, responses={403: {}})
def list_reports(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    who: HwDep,
    model: Annotated[str | None, Query(max_length=TEXT_MAX)] = None,
    profile: Annotated[str | None, Query(max_length=48)] = None,
    after: Annotated[int | None, Query(ge=1, le=ID_MAX)] = None,
    limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX)] = None,
) -> HwReportsPublic:
    """Reports, newest first: every report for the security team, a vendor's own for a
    vendor (asking for another vendor's model is 403)."""
    scope = hw_access.vendor_scope(who)
    if model is not None and scope is not None and not hw_access.may_use(
            who, session.get(ModelRegistration, model)):
        raise _deny(request, session, who, action="hw.report.read", target=model,
                    why=NOT_YOURS % model)
    page = min(limit or settings.limits.page_default, settings.limits.page_max)
    rows = hw_report_store.list_reports(session, vendor=scope, model=model, profile=profile,
                                        after=after, limit=page)
    next_after = rows[-1].id if len(rows) == page else None
    return HwReportsPublic(data=[_public(r) for r in rows], next_after=next_after)


def _readable(request: Request, session: Session, who: Principal, report_id: int
              ) -> HwReport:
    row = session.get(HwReport, report_id)
    if row is None:
        raise HTTPException(404, "no hardware report %d" % report_id)
    if not hw_access.may_use(who, session.get(ModelRegistration, row.model)):
        raise _deny(request, session, who, action="hw.report.read", target=str(report_id),
                    why="hardware report %d is of a device model not registered to your "
                    "vendor" % report_id)
    return row


@router.get("/reports/{report_id}", response_model=HwReportDetail, responses={403: {}})
def get_report(report_id: Annotated[int, Path(ge=1, le=ID_MAX)],
               request: Request, session: SessionDep, who: HwDep) -> HwReportDetail:
    """One report: what the fleet read from it, and the whole JSON."""
    row = _readable(request, session, who, report_id)
    return HwReportDetail.model_validate(row, update={"report": json.loads(row.report)})


@router.get("/reports/{report_id}/raw", responses={
    200: {"content": {"application/json": {}}}, 403: {}})
def get_report_raw(report_id: Annotated[int, Path(ge=1, le=ID_MAX)],
                   request: Request, session: SessionDep, who: HwDep) -> Response:
    """The report's bytes as uploaded (their SHA-256 is the report's ``sha256``)."""
    row = _readable(request, session, who, report_id)
    return Response(row.report.encode("utf-8"), media_type="application/json",
                    headers={"X-Content-SHA256": row.sha256})
