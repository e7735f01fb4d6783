"""Who may do what at the broker: the one place that decides the broker's access rules.

Every MQTT client authenticates with a certificate from the city CA; the broker takes the
certificate's CN as the username (``use_identity_as_username``) and as the client id
(``use_username_as_clientid``: a client cannot take over another's session by naming its
client id). Each identity is one of:

==================  =========================  ==============================================
CN                  kind                       may
==================  =========================  ==============================================
``urn:dev:...``     ``device``                 publish ``ce/v1/<cn>/up/+`` (its own ``up/csr``
                                               too, a key rotation's request, and no other
                                               device's); subscribe to, and
                                               receive, only ``ce/v1/<cn>/down/...``
``fleet-ingest``    ``ingest``                 subscribe to the ingest's shared subscriptions
                                               (``$share/<group>/ce/v1/+/up/readings|relay|
                                               result|csr``) or the same filters plain (one
                                               worker) and receive what they carry;
                                               nothing else
``fleet-commands``  ``commands``               publish ``ce/v1/+/down/cmd|desired``
``fleet-control``   ``control``                publish to the dynamic security plugin's
                                               control topic and read its responses
==================  =========================  ==============================================

A service may run as several processes, each with its own certificate and CN
``<service>-<suffix>`` (``fleet-ingest-2``): one CN is one client id at the broker.

A device certificate's CN is always a ``urn:dev:`` name (the CA signs only CSRs whose CN is
the registered device id, and ``batch.check_device_id`` allows nothing else), so no device
can claim a service's identity, and service names can never be device ids.

Why the dynamic security plugin and not Mosquitto's ``acl_file``: the ACL file does not
check subscriptions at all (Mosquitto 2.0's ``mosquitto_acl_check_default`` grants every
SUBSCRIBE and checks only delivery), so a device could join the ingest's shared
subscription, take a share of every device's batches and have them dropped at delivery by
its own read rule — acknowledged data lost. The plugin checks SUBSCRIBE against literal
filters, denies everything not granted (``defaultACLAccess`` all false) and kicks a
client's live session when its entry is deleted (``broker_sync``). It has no ``%u``
patterns, so each identity gets its own role of literal topics (``acls_for``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cityedge_core import topics
from cityedge_core.batch import check_device_id
from cityedge_core.errors import PeerError

DEVICE = "device"
INGEST = "ingest"
COMMANDS = "commands"
CONTROL = "control"
SERVICE_KINDS = (INGEST, COMMANDS, CONTROL)
INGEST_CN = "fleet-ingest"
COMMANDS_CN = "fleet-commands"
CONTROL_CN = "fleet-control"
DEFAULT_SERVICES = (INGEST_CN, COMMANDS_CN, CONTROL_CN)
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
ROLE_PREFIX = "acl:"  # one role per identity: "acl:<cn>"
_SERVICES = ((INGEST_CN, INGEST), (COMMANDS_CN, COMMANDS), (CONTROL_CN, CONTROL))
# a second process of a service (another ingest worker, the ingest's own control client)
# is <cn>-<suffix> with its own certificate: two connections with one CN would be one
# client id, and each would take the other's session over
_SUFFIX = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{8,64}")


@dataclass(frozen=True)
class Acl:
    """One rule of the dynamic security plugin (its JSON ``acls`` entry)."""

    acltype: str  # publishClientSend, publishClientReceive, subscribeLiteral, ...
    topic: str
    allow: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "priority": 0,
                "allow": self.allow}


def identity_kind(cn: str) -> str | None:
    """The kind of identity a certificate CN names, or None (then it may do nothing)."""
    for service_cn, kind in _SERVICES:
        if cn == service_cn or (cn.startswith(service_cn + "-")
                                and _SUFFIX.fullmatch(cn[len(service_cn) + 1:])):
            return kind
    try:
        check_device_id(cn)
    except PeerError:
        return None
    return DEVICE


def check_share_group(group: str) -> str:
    """A shared-subscription group name: 8-64 of ``A-Z a-z 0-9 _ -`` (one topic level)."""
    if not SHARE_GROUP.fullmatch(group):
        raise ValueError("the ingest share group must be 8-64 characters of A-Z a-z 0-9 _ -, "
                         "got %r" % group)
    return group


INGEST_KINDS = (topics.READINGS, topics.RELAY, topics.RESULT, topics.CSR)  # the ingest's


def ingest_filters(share_group: str) -> list[str]:
    """The shared subscriptions an ingest worker holds (``ingest_subscription=shared``)."""
    return ["$share/%s/%s" % (check_share_group(share_group), topics.every_up(kind))
            for kind in INGEST_KINDS]


def ingest_plain_filters() -> list[str]:
    """The ordinary subscriptions a lone ingest worker holds (``ingest_subscription=plain``):
    Mosquitto keeps these in its persistence file, and no shared one (docs/OPERATIONS.md
    section 8)."""
    return [topics.every_up(kind) for kind in INGEST_KINDS]


def ingest_subscriptions(share_group: str, mode: str) -> tuple[list[str], list[str]]:
    """The filters an ingest worker subscribes to in ``mode`` ("plain" or "shared"), and
    those of the other mode (it drops them from its session: a worker switched from one
    to the other must not hold both, which would deliver every message twice)."""
    plain, shared = ingest_plain_filters(), ingest_filters(share_group)
    if mode == "plain":
        return plain, shared
    if mode == "shared":
        return shared, plain
    raise ValueError("ingest_subscription is plain or shared, not %r" % mode)


def role_name(cn: str) -> str:
    return ROLE_PREFIX + cn


def acls_for(cn: str, share_group: str) -> tuple[Acl, ...]:
    """The rules of ``cn``'s role; ValueError for a CN that names no identity."""
    kind = identity_kind(cn)
    if kind == DEVICE:
        own_down = [topics.down(cn, k) for k in topics.DOWN_KINDS]
        filters = [*own_down, topics.down(cn, "+"), topics.down(cn, "#")]
        return (
            Acl("publishClientSend", topics.up(cn, "+")),
            Acl("publishClientReceive", topics.down(cn, "+")),
            *(Acl("subscribeLiteral", f) for f in filters),
            *(Acl("unsubscribeLiteral", f) for f in filters),
        )
    if kind == INGEST:
        shared = ingest_filters(share_group) + ingest_plain_filters()
        return (
            *(Acl("subscribeLiteral", f) for f in shared),
            *(Acl("unsubscribeLiteral", f) for f in shared),
            *(Acl("publishClientReceive", topics.every_up(k)) for k in INGEST_KINDS),
        )
    if kind == COMMANDS:
        return tuple(Acl("publishClientSend", topics.every_down(k)) for k in topics.DOWN_KINDS)
    if kind == CONTROL:
        return (
            Acl("publishClientSend", CONTROL_TOPIC),
            Acl("subscribeLiteral", CONTROL_RESPONSE_TOPIC),
            Acl("publishClientReceive", CONTROL_RESPONSE_TOPIC),
        )
    raise ValueError("%r names no broker identity (a device URN, or %s, %s or %s with an "
                     "optional -<suffix>)" % (cn, INGEST_CN, COMMANDS_CN, CONTROL_CN))


def role_json(cn: str, share_group: str) -> dict[str, Any]:
    return {"rolename": role_name(cn),
            "acls": [acl.to_json() for acl in acls_for(cn, share_group)]}


def client_json(cn: str) -> dict[str, Any]:
    """A client entry: no password (the certificate is the authentication), one role."""
    return {"username": cn, "roles": [{"rolename": role_name(cn), "priority": 0}]}
