"""The RabbitMQ cluster's rules (``broker_rabbitmq``) without a broker: each device's topic
permissions match its own routing keys and never another device's, dotted device ids
included (the MQTT plugin keeps a ``.`` of a topic, so an id may span routing-key words);
the client-id check (``cityedge_mqtt_client_id.erl``) run by a real Erlang VM, and the
configuration that loads it on every node."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_core import topics
from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet.broker import BrokerFiles

from support import cli
from support.mosquitto import TestPKI

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
    assert ingest.topic_write == ingest.topic_read == "^$"
    # its presence queue (declared, bound, read) and the event exchange (read), no other
    presence = rmq.PRESENCE_QUEUE_PREFIX + "0123abcd"
    assert re.fullmatch(ingest.configure, presence) and re.fullmatch(ingest.write, presence)
    assert re.fullmatch(ingest.read, presence) and re.fullmatch(ingest.read, rmq.EVENT_EXCHANGE)
    for name in (rmq.INGEST_QUEUE, rmq.EXCHANGE, rmq.PRESENCE_QUEUE_PREFIX, "amq.gen-x",
                 "mqtt-subscription-urn:dev:x:aqos1", rmq.PRESENCE_QUEUE_PREFIX + "a.b"):
        assert not re.fullmatch(ingest.configure, name) and not re.fullmatch(ingest.write, name)
    for name in (rmq.EXCHANGE, "mqtt-subscription-urn:dev:x:aqos1", "amq.rabbitmq.trace"):
        assert not re.fullmatch(ingest.read, name)
    device = rmq.rules_for("urn:dev:x:a")
    for pattern in (device.configure, device.write, device.read):  # no presence for them
        assert not re.fullmatch(pattern, rmq.EVENT_EXCHANGE)
        assert not re.fullmatch(pattern, presence)
    commands = rmq.rules_for("fleet-commands")
    assert re.fullmatch(commands.topic_write, rmq.routing_key(topics.down("urn:dev:x:a.b",
                                                                           "cmd")))
    assert not re.fullmatch(commands.topic_write, rmq.routing_key(topics.up("urn:dev:x:a",
                                                                             "readings")))
    defs = rmq.definitions(["fleet-ingest", "urn:dev:x:a"])
    assert all(u["password_hash"] == "" for u in defs["users"])  # certificates only
    assert [u["name"] for u in defs["users"]] == ["fleet-ingest", "urn:dev:x:a"]  # no guest
    assert defs["queues"][0]["arguments"]["x-queue-type"] == "quorum"


def _binding(who: object, key: object, source: object = "amq.topic") -> dict[str, object]:
    """The headers of a ``binding.created`` event (as pika gives them: str or bytes)."""
    return {"user_who_performed_action": who, "routing_key": key, "source_name": source,
            "destination_name": "mqtt-subscription-%sqos1" % who}


@given(ids, ids, st.sampled_from(["cmd", "ota", "trust"]), st.booleans())
def test_a_presence_event_names_only_the_device_that_subscribed_to_its_own_commands(
        a: str, b: str, kind: str, as_bytes: bool) -> None:
    key = rmq.routing_key(topics.down(b, kind))
    headers = _binding(a.encode() if as_bytes else a, key.encode() if as_bytes else key)
    expected = a if a == b and kind == "cmd" else None
    assert rmq.subscribed_device(headers) == expected


@pytest.mark.parametrize("headers", [
    None, {}, "text",
    _binding("fleet-ingest", "ce.v1.fleet-ingest.down.cmd"),  # not a device
    _binding("urn:dev:x:a", "ce.v1.urn:dev:x:a.down.cmd", source="amq.rabbitmq.event"),
    _binding("urn:dev:x:a", "ce.v1.urn:dev:x:a.up.readings"),
    _binding(None, "ce.v1.urn:dev:x:a.down.cmd"),
    _binding("urn:dev:x:a", 7),
    _binding("not a device id", "ce.v1.not a device id.down.cmd"),
], ids=["none", "empty", "text", "service", "other-exchange", "up-topic", "no-user",
        "key-not-text", "bad-id"])
def test_a_presence_event_that_is_not_a_devices_own_subscription_names_nobody(
        headers: object) -> None:
    assert rmq.subscribed_device(headers) is None


# (the vhost-access context the MQTT plugin hands the check, as an Erlang term; expected)
CLIENT_ID_CASES = [
    ('#{<<"client_id">> => <<"urn:dev:x:a">>}', "true"),  # its own CN
    ('#{<<"client_id">> => <<"urn:dev:x:b">>}', "false"),  # another device's
    ('#{<<"client_id">> => <<"urn:dev:x:a-relay">>}', "false"),
    ('#{<<"client_id">> => <<"mqtt-subscription-x">>}', "false"),
    ('#{peeraddr => {127,0,0,1}, <<"client_id">> => <<"urn:dev:x:a">>}', "true"),
    ("#{peeraddr => {127,0,0,1}}", "true"),  # AMQP, the CLI: no client id
    ("undefined", "true"),
]


def test_the_client_id_check_allows_only_the_users_own_id(tmp_path: Path) -> None:
    """The compiled backend in a real Erlang VM, with the contexts RabbitMQ 3.10 passes
    (``rabbit_access_control:create_vhost_access_authz_data``)."""
    (tmp_path / (rmq.CLIENT_ID_MODULE + ".beam")).write_bytes(rmq.compile_client_id_module())
    calls = ", ".join("%s:check_vhost_access({auth_user, <<\"urn:dev:x:a\">>, [], none}, "
                      "<<\"%s\">>, %s)" % (rmq.CLIENT_ID_MODULE, rmq.VHOST, ctx)
                      for ctx, _ in CLIENT_ID_CASES)
    # (its warning for a refusal would share stdout with the verdicts: logging off here)
    out = subprocess.run(["erl", "-noshell", "-kernel", "logger_level", "none",
                          "-pa", str(tmp_path), "-eval",
                          "io:format(\"~w~n\", [[%s]]), halt()." % calls],
                         capture_output=True, text=True, timeout=60, check=True)
    want = ",".join(want for _, want in CLIENT_ID_CASES)
    assert out.stdout.strip() == "[%s]" % want, out.stdout + out.stderr


def test_every_node_loads_the_client_id_check(tmp_path: Path) -> None:
    """``write`` gives every node the compiled backend on its code path and lists it
    beside the internal backend (Erlang reads ``advanced.config`` back)."""
    pki = TestPKI(tmp_path / "pki")
    files = BrokerFiles(cafile=pki.ca_pem, certfile=pki.server.cert_pem,
                        keyfile=pki.server.key_pem, crlfile=pki.write_crl(tmp_path / "crl.pem"))
    dirs = rmq.write(tmp_path / "conf", files, rmq.nodes(2), bind="127.0.0.1",
                     identities=["urn:dev:x:a"])
    for node, d in zip(rmq.nodes(2), dirs, strict=True):
        code = Path(rmq.env_for(node, d)["RABBITMQ_SERVER_CODE_PATH"])
        assert (code / (rmq.CLIENT_ID_MODULE + ".beam")).read_bytes().startswith(b"FOR1")
        out = subprocess.run(
            ["erl", "-noshell", "-eval",
             "{ok, [C]} = file:consult(\"%s\"), "
             "io:format(\"~w~n\", [proplists:get_value(auth_backends, "
             "proplists:get_value(rabbit, C))]), halt()." % (d / "advanced.config")],
            capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == ("[{rabbit_auth_backend_internal,[rabbit_auth_backend_"
                                      "internal,%s]}]" % rmq.CLIENT_ID_MODULE), out.stdout


def test_the_crl_names_are_openssls_hashes_asked_once_per_issuer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reconciler round (30 s) names the fleet's CRLs: a CRL re-signed by the same
    issuer (new bytes, same issuer name) takes the hash openssl gave the first time, and
    each of two issuers gets its own, equal to ``openssl crl -hash``."""
    one = TestPKI(tmp_path / "one", "cityedge test CA one")
    two = TestPKI(tmp_path / "two", "cityedge test CA two")
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(one.write_crl(tmp_path / "a.pem").read_bytes()
                         + two.write_crl(tmp_path / "b.pem").read_bytes())
    expected = [subprocess.run(["openssl", "crl", "-hash", "-noout", "-in", str(p)],
                               capture_output=True, text=True, check=True).stdout.strip()
                for p in (tmp_path / "a.pem", tmp_path / "b.pem")]
    rmq._ISSUER_HASHES.clear()
    calls: list[object] = []
    real_run = subprocess.run

    def counted(*args: object, **kw: object) -> object:
        calls.append(args[0])
        return real_run(*args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(rmq.subprocess, "run", counted)
    names = [n for n, _ in rmq.crl_hash_files(crl_file)]
    assert [n.split(".")[0] for n in names] == expected and len(calls) == 2
    # re-signed (new bytes) by the same two issuers, with a serial revoked
    crl_file.write_bytes(one.write_crl(tmp_path / "a.pem", [7]).read_bytes()
                         + two.write_crl(tmp_path / "b.pem").read_bytes())
    assert [n for n, _ in rmq.crl_hash_files(crl_file)] == names and len(calls) == 2


labels = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)


@given(st.lists(labels, min_size=2, max_size=5, unique=True), st.booleans())
def test_a_node_per_host_has_the_same_ports_and_long_names_with_full_hosts(
        names: list[str], full: bool) -> None:
    """``--node-host a,b,c``: a node on each host (names distinct, the same ports on
    every host), long node names (``USE_LONGNAME``, and ``--longnames`` for the CLI)
    exactly when the hosts are full names."""
    hosts = [h + ".city.example" if full else h for h in names]
    cluster = rmq.nodes(len(hosts), host=",".join(hosts))
    assert [n.name.split("@")[1] for n in cluster] == hosts
    assert len({n.name for n in cluster}) == len(hosts)
    assert {(n.mqtt_port, n.amqp_port, n.dist_port) for n in cluster} == {(8883, 5671, 25672)}
    assert rmq.long_names(n.name for n in cluster) == full
    for node in cluster:
        env = rmq.env_for(node, Path("/n"))
        assert (env.get("RABBITMQ_USE_LONGNAME") == "true") == full


@pytest.mark.parametrize(("count", "host", "why"), [
    (3, "a.x,b.x", "2 node hosts for 3 nodes"),
    (2, "a.x,a.x", "repeat"),
    (2, "a.x,b", "long and short"),
    (2, "a.x,b_x", "a host name or an IPv4 address"),
    (1, "-a", "a host name or an IPv4 address"),
])
def test_node_hosts_that_cannot_make_a_cluster_are_refused(count: int, host: str,
                                                           why: str) -> None:
    with pytest.raises(ValueError, match=why):
        rmq.nodes(count, host=host)


def test_one_host_keeps_short_names_and_the_next_ports() -> None:
    cluster = rmq.nodes(3, host="localhost")
    assert [n.mqtt_port for n in cluster] == [8883, 8884, 8885]
    assert not rmq.long_names(n.name for n in cluster)
    assert "RABBITMQ_USE_LONGNAME" not in rmq.env_for(cluster[0], Path("/n"))


def test_broker_config_writes_a_node_per_host_and_refuses_a_short_list(tmp_path: Path) -> None:
    """``cityedge broker config --engine rabbitmq --node-host a,b,c``, as an operator runs
    it: a directory per node named for its host, long names, the same ports, and how to
    start each; two hosts for three nodes are refused with the reason, nothing written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env.update(CITYEDGE_MODE="development", CITYEDGE_CA_DIR=str(tmp_path / "ca"),
               CITYEDGE_DATABASE_URL="sqlite:///%s" % (tmp_path / "fleet.sqlite3"))
    r = cli.run(["ca", "init", "--root-dir", str(tmp_path / "root"), "--out-dir",
                 str(tmp_path / "ca")], env)
    assert r.returncode == 0, r.stderr
    r = cli.run(["ca", "issue-service", "--cn", "broker", "--out-dir", str(tmp_path / "svc"),
                 "--server", "rmq1.city.example"], env)
    assert r.returncode == 0, r.stderr
    r = cli.run(["fleet", "init-db"], env)
    assert r.returncode == 0, r.stderr
    hosts = ["rmq1.city.example", "rmq2.city.example", "rmq3.city.example"]
    args = ["broker", "config", "--engine", "rabbitmq", "--certfile",
            str(tmp_path / "svc" / "broker.crt"), "--keyfile", str(tmp_path / "svc" / "broker.key")]
    r = cli.run([*args, "--out-dir", str(tmp_path / "two"), "--node-host", ",".join(hosts[:2])],
                env)
    assert r.returncode == 1, r.stdout + r.stderr  # a UserError
    assert "2 node hosts for 3 nodes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "two").exists() or not any((tmp_path / "two").iterdir())
    r = cli.run([*args, "--out-dir", str(tmp_path / "three"), "--node-host", ",".join(hosts)],
                env)
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert [name.split("@")[1] for name, _ in lines] == hosts
    for name, d in lines:
        env_file = (Path(d) / "rabbitmq-env.conf").read_text()
        assert "NODENAME=%s\nUSE_LONGNAME=true\nDIST_PORT=25672\n" % name in env_file
        conf = (Path(d) / "rabbitmq.conf").read_text()
        assert "mqtt.listeners.ssl.default = 0.0.0.0:8883" in conf
        assert all("= ce%d@%s" % (k + 1, h) in conf for k, h in enumerate(hosts))
    assert "RABBITMQ_CONF_ENV_FILE=" in r.stderr
