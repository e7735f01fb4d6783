"""Who may see and do what in the console: exactly who may call the API behind it.

Each console page and form names the API operation it shows or performs (``Api``); the
roles it lets in are read from that operation's own ``require_role`` dependency, so the
console cannot drift from the API (a page is never wider than its endpoint). Each page also
links to that operation in the API docs (``/docs``), the "API call behind it".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fastapi.routing import APIRoute

from cityedge_fleet.api import (
    audit_routes,
    campaigns,
    commands,
    devices,
    enroll_routes,
    hw_reports,
    ota_routes,
)
from cityedge_fleet.auth import Principal, roles_of_route
from cityedge_fleet.models import Role

ROUTERS = (audit_routes.router, campaigns.router, commands.router, devices.router,
           enroll_routes.router, hw_reports.router, ota_routes.router)


@dataclass(frozen=True)
class Api:
    method: str
    path: str  # as the API declares it: ``/devices/{device_id}``

    @property
    def roles(self) -> frozenset[Role]:
        return _route(self.method, self.path)[0]

    @property
    def docs(self) -> str:
        """The operation in the API docs page (Swagger UI's deep link)."""
        return _route(self.method, self.path)[1]

    def allows(self, who: Principal) -> bool:
        return who.role in self.roles

    def text(self, **params: object) -> str:
        """The call as one would write it, with its path parameters filled in."""
        path = self.path
        for key, value in params.items():
            path = path.replace("{%s}" % key, str(value))
        return "%s %s" % (self.method, path)


@functools.cache
def _route(method: str, path: str) -> tuple[frozenset[Role], str]:
    for router in ROUTERS:
        for route in router.routes:
            if (isinstance(route, APIRoute) and route.path == path
                    and method in (route.methods or ())):
                roles = _roles(route)
                tag = str(route.tags[0]) if route.tags else "default"
                return roles, "/docs#/%s/%s" % (tag, route.unique_id)
    raise LookupError("the API has no %s %s" % (method, path))


def _roles(route: APIRoute) -> frozenset[Role]:
    roles = roles_of_route(route)
    if roles is not None:
        return roles
    raise LookupError("%s has no role check: the console shows no public operation"
                      % route.path)


# the operations behind the console's pages and forms
DEVICES = Api("GET", "/devices")
DEVICE = Api("GET", "/devices/{device_id}")
CREDENTIALS = Api("GET", "/devices/{device_id}/credentials")
READINGS = Api("GET", "/devices/{device_id}/readings")
EVENTS = Api("GET", "/devices/{device_id}/events")
COMMANDS = Api("GET", "/devices/{device_id}/commands")
ROTATION_CAMPAIGNS = Api("GET", "/campaigns")
ROTATION_CAMPAIGN = Api("GET", "/campaigns/{campaign_id}")
OTA_CAMPAIGNS = Api("GET", "/ota/campaigns")
OTA_CAMPAIGN = Api("GET", "/ota/campaigns/{campaign_id}")
AUDIT = Api("GET", "/audit")
AUDIT_VERIFY = Api("GET", "/audit/verify")
ENROLLMENT_TOKEN = Api("POST", "/enrollment/tokens")
HW_REPORTS = Api("GET", "/hw/reports")
KEY_REPORT = Api("GET", "/keys/report")
CAMPAIGN_ACTIONS = ("pause", "resume", "abort")


def campaign_action(kind: str, action: str) -> Api:
    if action not in CAMPAIGN_ACTIONS:
        raise LookupError(action)
    prefix = "/ota/campaigns" if kind == "ota" else "/campaigns"
    return Api("POST", "%s/{campaign_id}/%s" % (prefix, action))


@dataclass(frozen=True)
class Page:
    key: str
    title: str
    href: str
    apis: tuple[Api, ...]  # any one of them lets a role in

    def allows(self, who: Principal) -> bool:
        return any(api.allows(who) for api in self.apis)


PAGES = (
    Page("overview", "Overview", "/console/", (DEVICES,)),
    Page("devices", "Devices", "/console/devices", (DEVICES,)),
    Page("campaigns", "Campaigns", "/console/campaigns", (ROTATION_CAMPAIGNS, OTA_CAMPAIGNS)),
    Page("audit", "Audit log", "/console/audit", (AUDIT_VERIFY,)),
    Page("enrollment", "Enrollment tokens", "/console/enrollment", (ENROLLMENT_TOKEN,)),
    Page("hardware", "Hardware reports", "/console/hardware", (HW_REPORTS,)),
)
PAGE = {p.key: p for p in PAGES}


def pages_for(who: Principal) -> list[Page]:
    return [p for p in PAGES if p.allows(who)]
