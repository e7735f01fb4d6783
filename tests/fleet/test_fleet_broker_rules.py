"""The broker's access rules as data (``broker_acl``), without a broker: which CN names
which identity, what each may do, and the configuration ``broker config`` writes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_core import topics
from cityedge_fleet import broker, broker_acl
from cityedge_fleet.broker_acl import Acl

DEV = "urn:dev:mac:0024befffe804ff1"


@pytest.mark.parametrize(("cn", "kind"), [
    (DEV, broker_acl.DEVICE),
    ("urn:dev:ops:city-cabinet-17", broker_acl.DEVICE),
    ("fleet-ingest", broker_acl.INGEST),
    ("fleet-ingest-2", broker_acl.INGEST),
    ("fleet-ingest-eu-west-1", broker_acl.INGEST),
    ("fleet-commands", broker_acl.COMMANDS),
    ("fleet-control", broker_acl.CONTROL),
    ("fleet-control-ingest", broker_acl.CONTROL),
    ("fleet-ingest-", None),
    ("fleet-ingestx", None),
    ("fleet-ingest-A", None),
    ("FLEET-INGEST", None),
    ("fleet-ingest-" + "a" * 33, None),
    ("broker", None),
    ("urn:dev:mac:00/up/#", None),
    ("urn:dev:mac:+", None),
    ("", None),
])
def test_a_cn_names_one_identity_or_none(cn: str, kind: str | None) -> None:
    assert broker_acl.identity_kind(cn) == kind
    if kind is None:
        with pytest.raises(ValueError):
            broker_acl.acls_for(cn, "cityedge-ingest")


@given(st.text(max_size=40))
def test_no_device_name_is_a_service_name(cn: str) -> None:
    kind = broker_acl.identity_kind(cn)
    if kind == broker_acl.DEVICE:
        assert cn.startswith("urn:dev:") and "/" not in cn and "+" not in cn and "#" not in cn
    elif kind is not None:
        assert cn.startswith("fleet-")


def _allowed(acls: tuple[Acl, ...], acltype: str) -> set[str]:
    return {a.topic for a in acls if a.acltype == acltype and a.allow}


def test_a_device_may_write_its_up_topics_and_read_its_down_topics_only() -> None:
    acls = broker_acl.acls_for(DEV, "cityedge-ingest")
    assert _allowed(acls, "publishClientSend") == {topics.up(DEV, "+")}
    assert _allowed(acls, "publishClientReceive") == {topics.down(DEV, "+")}
    assert _allowed(acls, "subscribeLiteral") == {
        topics.down(DEV, topics.CMD), topics.down(DEV, topics.DESIRED),
        topics.down(DEV, "+"), topics.down(DEV, "#")}
    assert not _allowed(acls, "subscribePattern")  # patterns would match other devices


def test_the_ingest_may_only_hold_its_shared_subscriptions() -> None:
    """... or the same four filters plain (one worker: docs/OPERATIONS.md section 8)."""
    acls = broker_acl.acls_for("fleet-ingest-2", "secret-group-7")
    assert _allowed(acls, "subscribeLiteral") == {
        "$share/secret-group-7/ce/v1/+/up/readings", "$share/secret-group-7/ce/v1/+/up/relay",
        "$share/secret-group-7/ce/v1/+/up/result", "$share/secret-group-7/ce/v1/+/up/csr",
        "ce/v1/+/up/readings", "ce/v1/+/up/relay", "ce/v1/+/up/result", "ce/v1/+/up/csr"}
    assert not _allowed(acls, "publishClientSend")
    for mode in ("plain", "shared"):  # a worker subscribes to one set and drops the other
        mine, other = broker_acl.ingest_subscriptions("secret-group-7", mode)
        assert set(mine) | set(other) == _allowed(acls, "subscribeLiteral")
        assert not set(mine) & set(other)
        assert all(f.startswith("$share/") == (mode == "shared") for f in mine)


@pytest.mark.parametrize("group", ["ingest", "a/b", "has+plus", "#", "x" * 65, ""])
def test_a_share_group_is_one_long_enough_topic_level(group: str) -> None:
    with pytest.raises(ValueError):
        broker_acl.check_share_group(group)


def test_the_dynsec_state_denies_by_default_and_grants_each_identity_its_role() -> None:
    state = broker.dynsec_config([DEV, *broker_acl.DEFAULT_SERVICES], "cityedge-ingest")
    assert state["defaultACLAccess"] == {"publishClientSend": False,
                                         "publishClientReceive": False,
                                         "subscribe": False, "unsubscribe": False}
    assert sorted(c["username"] for c in state["clients"]) == sorted(
        [DEV, *broker_acl.DEFAULT_SERVICES])
    assert all("password" not in c for c in state["clients"])  # the certificate authenticates
    roles = {r["rolename"]: r for r in state["roles"]}
    for client in state["clients"]:
        (role,) = client["roles"]
        assert role["rolename"] in roles
    json.dumps(state)  # what the plugin loads
    with pytest.raises(ValueError):
        broker.dynsec_config(["not-an-identity"], "cityedge-ingest")
