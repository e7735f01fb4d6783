"""The audit log for the security team: page through, verify the chain, export JSON lines."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlmodel import Session, col, select

from cityedge_fleet import audit
from cityedge_fleet.api.deps import SecurityDep
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import ID_MAX, AuditPublic, AuditRecord, AuditVerifyResult

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=list[AuditPublic])
def list_audit(session: SessionDep, who: SecurityDep,
               after: Annotated[int, Query(ge=0, le=ID_MAX)] = 0,
               limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Sequence[AuditRecord]:
    return session.exec(select(AuditRecord).where(col(AuditRecord.id) > after)
                        .order_by(col(AuditRecord.id)).limit(limit)).all()


@router.get("/verify", response_model=AuditVerifyResult)
def verify_audit(session: SessionDep, who: SecurityDep) -> AuditVerifyResult:
    return audit.verify(session)


@router.get("/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def export_audit(session: SessionDep, who: SecurityDep) -> StreamingResponse:
    engine = session.get_bind()
    session.close()  # end the request's transaction: on SQLite it holds the write lock

    def lines() -> Iterator[str]:
        with Session(engine) as s:
            yield from audit.export_jsonl(s)

    return StreamingResponse(lines(), media_type="application/x-ndjson")
