"""API tokens: an admin creates (shown once), lists and revokes them. A technician token
may be scoped to sites (``sites``; see ``auth.Principal.may_act_at``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from sqlmodel import col, select

from cityedge_fleet import audit
from cityedge_fleet.api.deps import AdminDep
from cityedge_fleet.auth import client_address, create_api_token
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import (
    ID_MAX,
    ApiToken,
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenPublic,
)

router = APIRouter(prefix="/tokens", tags=["tokens"])


REVOKE_LINK = {"RevokeToken": {
    "operationRef": "#/paths/~1tokens~1{token_id}~1revoke/post",
    "parameters": {"token_id": "$response.body#/id"}}}


@router.post("", response_model=ApiTokenCreated, status_code=201,
             responses={201: {"links": REVOKE_LINK}})
def create_token(body: ApiTokenCreate, request: Request, session: SessionDep,
                 who: AdminDep) -> ApiTokenCreated:
    row, token = create_api_token(session, name=body.name, role=body.role, created_by=who.name,
                                  sites=body.sites, vendor=body.vendor)
    detail: dict[str, object] = {"role": body.role.value, "id": row.id}
    if body.sites:
        detail["sites"] = body.sites
    if body.vendor is not None:
        detail["vendor"] = body.vendor
    audit.append(session, actor=who.name, action="token.create", outcome=audit.OK,
                 target=body.name, source=client_address(request), detail=detail)
    session.commit()
    return ApiTokenCreated.model_validate(row, update={"token": token})


@router.get("", response_model=list[ApiTokenPublic])
def list_tokens(session: SessionDep, who: AdminDep) -> Sequence[ApiToken]:
    return session.exec(select(ApiToken).order_by(col(ApiToken.id))).all()


@router.post("/{token_id}/revoke", response_model=ApiTokenPublic)
def revoke_token(token_id: Annotated[int, Path(ge=1, le=ID_MAX)], request: Request,
                 session: SessionDep, who: AdminDep) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise HTTPException(404, "no token %d" % token_id)
    row.revoked = True
    session.add(row)
    audit.append(session, actor=who.name, action="token.revoke", outcome=audit.OK,
                 target=row.name, source=client_address(request), detail={"id": token_id})
    session.commit()
    session.refresh(row)
    return row
