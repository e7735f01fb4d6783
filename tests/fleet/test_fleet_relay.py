"""Relayed batches (``ce/v1/<gateway>/up/relay``) and grouped transactions, on SQLite and
PostgreSQL: a gateway forwards its own nodes' batches unchanged; each is verified with the
node's own key and chained per node, the reading names the gateway; forgeries,
unregistered or quarantined nodes, a gateway's own batch passed off as relayed, and any
device relaying a node that does not report through it are refused."""

from __future__ import annotations

from sqlmodel import Session, select

from cityedge_core import batch as batchmod
from cityedge_core import chain
from cityedge_fleet import ingest
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import Device, DeviceState, IngestEvent, Reading, Role
from cityedge_host.crypto import EcSigner

from support.fleet import (
    Api,
    device_body,
    enroll_device,
    forgery,
    records,
    relay_topic,
    set_gateway,
)


def test_relayed_node_batch_is_stored_under_the_node_with_the_gateway(api: Api) -> None:
    gw = enroll_device(api, 1)
    node = enroll_device(api, 2, gateway=gw.id)
    ing = Ingestor(api.engine, api.settings)
    b1, b2, b3 = (node.sign(2) for _ in range(3))
    out = ing.handle(relay_topic(gw.id), b1)
    assert (out.status, out.device, out.readings, out.via) == (chain.OK, node.id, 2, gw.id)
    assert ing.handle(relay_topic(gw.id), b1).status == chain.DUPLICATE
    assert ing.handle(node.topic, b3).status == chain.GAP  # one chain per node, any path
    assert ing.handle(relay_topic(gw.id), b2).status == chain.REORDERED
    assert ing.handle(gw.topic, gw.sign(1)).status == chain.OK  # the gateway's own, as before
    viewer = api.headers(Role.viewer)
    rows = api.client.get("/devices/%s/readings" % node.id, headers=viewer).json()
    assert sorted((r["batch_seq"], r["via"]) for r in rows) == [
        (1, gw.id), (1, gw.id), (2, gw.id), (2, gw.id), (3, None), (3, None)]
    got = api.client.get("/devices/%s" % node.id, headers=viewer).json()
    assert got["state"] == "active" and got["chain"]["last_seq"] == 3
    with Session(api.engine) as s:
        gw_rows = s.exec(select(Reading).where(Reading.device_id == gw.id)).all()
        assert [(r.batch_seq, r.via) for r in gw_rows] == [(1, None)]
        dup = s.exec(select(IngestEvent).where(IngestEvent.status == "duplicate")).one()
        assert dup.device_id == node.id and gw.id in dup.detail


def test_relayed_forgery_and_unregistered_node_are_refused(api: Api) -> None:
    gw = enroll_device(api, 3)
    node = enroll_device(api, 4, gateway=gw.id)
    ing = Ingestor(api.engine, api.settings)
    forged = forgery(node.signer.kid, node.id, 1)
    assert ing.handle(relay_topic(gw.id), forged).status == chain.BAD_SIGNATURE
    stranger = EcSigner.generate()  # a node nobody registered
    w = batchmod.BatchWriter("urn:dev:mac:00000000beef", stranger, stranger.kid)
    out = ing.handle(relay_topic(gw.id), w.sign(records(2), boot=1))
    assert out.status == chain.UNKNOWN_KEY and out.device == gw.id
    with Session(api.engine) as s:
        assert s.exec(select(Reading)).first() is None
        gateway = s.get(Device, gw.id)
        assert gateway is not None and gateway.forgeries == 1  # the publisher is charged
        assert s.get(Device, node.id).forgeries == 0  # type: ignore[union-attr]
    # a node the security team quarantined is not let in through a gateway either
    r = api.client.post("/devices/%s/state" % node.id, json={"state": "quarantined"},
                        headers=api.headers(Role.security))
    assert r.status_code == 200, r.text
    assert ing.handle(relay_topic(gw.id), node.sign(1)).status == ingest.NOT_ACCEPTING
    # and a quarantined gateway relays nothing
    other = enroll_device(api, 5, gateway=gw.id)
    with Session(api.engine) as s:
        g = s.get(Device, gw.id)
        assert g is not None
        g.state = DeviceState.quarantined
        s.add(g)
        s.commit()
    assert ing.handle(relay_topic(gw.id), other.sign(1)).status == ingest.NOT_ACCEPTING


def test_gateway_cannot_pass_off_its_own_batch_as_a_node(api: Api) -> None:
    gw = enroll_device(api, 6)
    node = enroll_device(api, 7, gateway=gw.id)
    ing = Ingestor(api.engine, api.settings)
    # its own batch on the relay topic: relays carry other devices' batches only
    assert ing.handle(relay_topic(gw.id), gw.sign(1)).status == ingest.TOPIC_MISMATCH
    # a batch naming the node, signed with the gateway's key: on either topic
    as_node = batchmod.BatchWriter(node.id, gw.signer, gw.signer.kid).sign(records(1), boot=1)
    assert ing.handle(relay_topic(gw.id), as_node).status == ingest.TOPIC_MISMATCH
    assert ing.handle(gw.topic, as_node).status == chain.BAD_SIGNATURE
    # a node's batch published directly on the gateway's readings topic
    assert ing.handle(gw.topic, node.sign(1)).status == ingest.TOPIC_MISMATCH
    with Session(api.engine) as s:
        assert s.exec(select(Reading)).first() is None


def test_a_group_is_decided_exactly_like_one_message_at_a_time(api: Api) -> None:
    """One transaction over many messages and devices gives the verdicts (and stored rows)
    of handling them one by one."""
    gw = enroll_device(api, 10)
    a = enroll_device(api, 8)
    b = enroll_device(api, 9, gateway=gw.id)
    a1, a2, a3 = (a.sign(2) for _ in range(3))
    b1, b2 = (b.sign(3) for _ in range(2))
    msgs = [(a.topic, a1), (a.topic, a1), (b.topic, b2), (relay_topic(gw.id), b1),
            (a.topic, a3), (a.topic, a2), (b.topic, a2), ("ce/v1/x/up/other", a1),
            (relay_topic(gw.id), b1), (a.topic, b"\xd2\x84garbage")]
    ing = Ingestor(api.engine, api.settings)
    outcomes = ing.handle_many(msgs)
    assert [o.status for o in outcomes] == [
        chain.OK, chain.DUPLICATE, chain.GAP, chain.REORDERED, chain.GAP, chain.REORDERED,
        ingest.TOPIC_MISMATCH, ingest.BAD_TOPIC, chain.DUPLICATE, chain.MALFORMED]
    viewer = api.headers(Role.viewer)
    a_rows = api.client.get("/devices/%s/readings" % a.id, headers=viewer).json()
    b_rows = api.client.get("/devices/%s/readings" % b.id, headers=viewer).json()
    assert sorted(r["batch_seq"] for r in a_rows) == [1, 1, 2, 2, 3, 3]
    assert sorted(r["batch_seq"] for r in b_rows) == [1, 1, 1, 2, 2, 2]
    assert api.client.get("/devices/%s" % a.id, headers=viewer).json()["chain"] == {
        "last_seq": 3, "missing": 0, "forgotten": 0}


def test_only_the_nodes_gateway_relays_its_batches(api: Api) -> None:
    """A device holding another device's captured (validly signed) batch cannot have it
    accepted through its own relay topic: only the gateway the node is registered with
    relays it. Each refusal is an event and counts against the publisher."""
    gw = enroll_device(api, 11)
    node = enroll_device(api, 12, gateway=gw.id)
    thief = enroll_device(api, 13)  # any device: not a gateway at all
    other_gw = enroll_device(api, 14)
    stray = enroll_device(api, 15)  # reports directly: no gateway
    ing = Ingestor(api.engine, api.settings)
    n1, n2 = node.sign(2), node.sign(2)
    assert ing.handle(relay_topic(thief.id), n1).status == ingest.NOT_RELAY_GATEWAY
    assert ing.handle(relay_topic(other_gw.id), n1).status == ingest.NOT_RELAY_GATEWAY
    assert ing.handle(relay_topic(gw.id), stray.sign(1)).status == ingest.NOT_RELAY_GATEWAY
    out = ing.handle(relay_topic(gw.id), n1)
    assert (out.status, out.device, out.via) == (chain.OK, node.id, gw.id)
    # the node moves to another gateway: the old one may no longer relay for it
    set_gateway(api, node.id, other_gw.id)
    assert ing.handle(relay_topic(gw.id), n2).status == ingest.NOT_RELAY_GATEWAY
    assert ing.handle(relay_topic(other_gw.id), n2).status == chain.OK
    with Session(api.engine) as s:
        refused = s.exec(select(IngestEvent).where(
            IngestEvent.status == ingest.NOT_RELAY_GATEWAY)).all()
        assert sorted(e.device_id for e in refused) == sorted(
            [thief.id, other_gw.id, gw.id, gw.id])
        counts = {d: s.get(Device, d).malformed  # type: ignore[union-attr]
                  for d in (thief.id, other_gw.id, gw.id, node.id)}
        assert counts == {thief.id: 1, other_gw.id: 1, gw.id: 2, node.id: 0}
        assert sorted((r.batch_seq, r.via) for r in s.exec(select(Reading).where(
            Reading.device_id == node.id))) == [(1, gw.id), (1, gw.id), (2, other_gw.id),
                                                (2, other_gw.id)]


def test_a_nodes_gateway_must_be_another_registered_device(api: Api) -> None:
    tech = api.headers(Role.technician)
    gw = device_body(20)
    assert api.client.post("/devices", json=gw, headers=tech).status_code == 201
    unknown = device_body(21, gateway_id="urn:dev:mac:00000000dead")
    r = api.client.post("/devices", json=unknown, headers=tech)
    assert r.status_code == 409 and "not registered" in r.text
    itself = device_body(22)
    itself["gateway_id"] = itself["id"]
    assert api.client.post("/devices", json=itself, headers=tech).status_code == 409
    bad = api.client.post("/devices", json=device_body(23, gateway_id="gw-1"), headers=tech)
    assert bad.status_code == 422
    node = device_body(24, gateway_id=gw["id"])
    r = api.client.post("/devices", json=node, headers=tech)
    assert r.status_code == 201 and r.json()["gateway_id"] == gw["id"]
    url = "/devices/%s" % node["id"]
    assert api.client.patch(url, json={"gateway_id": node["id"]},
                            headers=tech).status_code == 409
    assert api.client.patch(url, json={"gateway_id": "urn:dev:mac:00000000dead"},
                            headers=tech).status_code == 409
    r = api.client.patch(url, json={"gateway_id": None}, headers=tech)
    assert r.status_code == 200 and r.json()["gateway_id"] is None
