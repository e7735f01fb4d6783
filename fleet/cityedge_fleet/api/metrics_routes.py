"""``GET /metrics``: the Prometheus exposition (``cityedge_fleet.metrics``), for a
``monitor`` token (``cityedge fleet create-token --role monitor``, given to the scraper as
its bearer token). Metrics name the fleet's devices, sites and campaigns: not public."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cityedge_fleet import metrics
from cityedge_fleet.auth import Principal, require_role
from cityedge_fleet.db_session import SessionDep
from cityedge_fleet.models import Role

router = APIRouter(tags=["metrics"])
MonitorDep = Annotated[Principal, Depends(require_role(Role.monitor))]


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def get_metrics(request: Request, session: SessionDep, who: MonitorDep) -> Response:
    session.close()  # end the token check's transaction: on SQLite it holds the write lock
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = metrics.registry_for(request.app)
    return Response(metrics.render(registry), media_type=CONTENT_TYPE_LATEST)
