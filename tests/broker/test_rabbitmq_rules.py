"""The RabbitMQ cluster's rules (``broker_rabbitmq``) without a broker: each device's topic
permissions match its own routing keys and never another device's, dotted device ids
included (the MQTT plugin keeps a ``.`` of a topic, so an id may span routing-key words)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from cityedge_core import topics
from cityedge_fleet import broker_rabbitmq as rmq

ids = st.text("abc019.-:", min_size=1, max_size=12).map(lambda s: "urn:dev:x:" + s)


@given(ids, ids, st.sampled_from(["readings", "relay", "result", "csr", "status"]))
def test_a_device_may_write_only_its_own_up_topics(a: str, b: str, kind: str) -> None:
    rules = rmq.rules_for(a)
    own = rmq.routing_key(topics.up(a, kind))
    other = rmq.routing_key(topics.up(b, kind))
    assert re.fullmatch(rules.topic_write, own)
    assert (re.fullmatch(rules.topic_write, other) is not None) == (a == b)
    assert not re.fullmatch(rules.topic_write, rmq.routing_key(topics.down(a, "cmd")))


@given(ids, ids)
def test_a_device_may_read_only_its_own_down_topics(a: str, b: str) -> None:
    rules = rmq.rules_for(a)
    assert re.fullmatch(rules.topic_read, rmq.routing_key(topics.down(a, "cmd")))
    other = rmq.routing_key(topics.down(b, "cmd"))
    assert (re.fullmatch(rules.topic_read, other) is not None) == (a == b)
    for wildcard in ("ce.v1.*.down.cmd", "ce.v1.#", "#"):
        assert not re.fullmatch(rules.topic_read, wildcard)


@given(ids, st.sampled_from(["readings", "relay", "result", "csr"]))
def test_the_ingest_gets_back_the_topic_the_device_used(device: str, kind: str) -> None:
    topic = topics.up(device, kind)
    assert rmq.topic_of(rmq.routing_key(topic)) == topic


def test_services_get_only_their_own_grants() -> None:
    ingest = rmq.rules_for("fleet-ingest")
    assert re.fullmatch(ingest.read, rmq.INGEST_QUEUE)
    assert (ingest.configure, ingest.write, ingest.topic_write) == ("^$", "^$", "^$")
    commands = rmq.rules_for("fleet-commands")
    assert re.fullmatch(commands.topic_write, rmq.routing_key(topics.down("urn:dev:x:a.b",
                                                                           "cmd")))
    assert not re.fullmatch(commands.topic_write, rmq.routing_key(topics.up("urn:dev:x:a",
                                                                             "readings")))
    defs = rmq.definitions(["fleet-ingest", "urn:dev:x:a"])
    assert all(u["password_hash"] == "" for u in defs["users"])  # certificates only
    assert [u["name"] for u in defs["users"]] == ["fleet-ingest", "urn:dev:x:a"]  # no guest
    assert defs["queues"][0]["arguments"]["x-queue-type"] == "quorum"
