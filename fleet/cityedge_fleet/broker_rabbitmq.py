"""RabbitMQ cluster configuration for the fleet: what ``cityedge broker config --engine
rabbitmq`` writes (the clustered deployment next to single-node Mosquitto; the comparison
and the reasons are in docs/BROKERS.md).

Devices speak MQTT 3.1.1 (RabbitMQ's MQTT plugin) over TLS with their certificate; the
ingest consumes over AMQP 0-9-1 with its own certificate (``ingest_amqp``). One directory
per node (``node-<i>/``) holds:

- ``rabbitmq.conf``: listeners on TLS only (MQTT for devices and the command publisher,
  AMQP for the ingest), the certificate's CN as the username (``ssl_cert_login``,
  ``EXTERNAL`` on AMQP), no anonymous MQTT, the cluster's peers;
- ``advanced.config``: the TLS options, which ``rabbitmq.conf`` cannot express: peer
  verification against the city CA, a client certificate required, and the CRL checked on
  every handshake from a hash directory (``crl/<issuer hash>.r0``, one per intermediate in
  service, re-read each time: a new CRL takes effect without a restart); and the
  authorization backends: the internal one, and ``cityedge_mqtt_client_id`` beside it;
- ``ebin/cityedge_mqtt_client_id.beam``: that backend, compiled here from
  ``rabbitmq/cityedge_mqtt_client_id.erl`` (``erlc``, which comes with RabbitMQ's Erlang).
  It refuses an MQTT CONNECT whose client id is not the certificate's CN, before the MQTT
  plugin registers the id: RabbitMQ 3.10 has no setting for this (Mosquitto's
  ``use_username_as_clientid``), and without it a stolen device closes another device's
  connection by naming its client id (the plugin closes an id's older holder);
- ``enabled_plugins`` and ``rabbitmq-env.conf`` (node name, ports, data directory, the
  ``ebin`` directory on the code path).

``definitions.json`` (shared, loaded at boot when it changed since the cluster last
imported it: ``definitions.skip_if_unchanged``, so a restart keeps the cuts made since) is
the registry's view, as ``dynamic-security.json`` is for Mosquitto: every user without a
password (only a certificate logs in), one vhost, the quorum queue ``cityedge.ingest`` bound to
``amq.topic`` for every ``up/`` kind the ingest takes, and per identity its resource and
topic permissions (``rules_for``). Topic permissions are literal per device (the device id
escaped into the regex), not RabbitMQ's ``{username}`` expansion: a device id may hold
``.``, which expands unescaped and would match another device's id.

Why the messages are safe: a QoS 1 PUBLISH is acknowledged by the MQTT plugin only after
the quorum queue confirmed it, i.e. a majority of the nodes wrote it; the ingest
acknowledges each message after its database commit, so a killed node or worker leaves
unacknowledged messages that RabbitMQ delivers again (the chain then calls a twice-stored
batch a duplicate).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from cityedge_core import topics
from cityedge_fleet import broker_acl
from cityedge_fleet.broker import MAX_PACKET_BYTES, TLS12_CIPHERS, BrokerFiles
from cityedge_fleet.ca import load_crls
from cityedge_host.files import write_atomic

VHOST = "cityedge"
INGEST_QUEUE = "cityedge.ingest"
EXCHANGE = "amq.topic"  # where the MQTT plugin publishes
DEFINITIONS_FILE = "definitions.json"
CRL_DIR = "crl"
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_mechanism_ssl", "rabbitmq_event_exchange")
# the event exchange (``rabbitmq_event_exchange``, in the fleet's vhost): the ingest learns
# from a ``binding.created`` of a device's own ``down/cmd`` that it is back and subscribed
# (``subscribed_device``), and makes its pending commands due at once
EVENT_EXCHANGE = "amq.rabbitmq.event"
PRESENCE_KEY = "binding.created"
PRESENCE_QUEUE_PREFIX = "cityedge.presence."  # one per ingest worker, exclusive
PRESENCE_QUEUE_MAX = 10_000  # events kept for a slow worker; the oldest go first
# the authorization backend that binds an MQTT client id to the CN (module docstring)
CLIENT_ID_MODULE = "cityedge_mqtt_client_id"
CLIENT_ID_SOURCE = Path(__file__).parent / "rabbitmq" / (CLIENT_ID_MODULE + ".erl")
CODE_DIR = "ebin"  # in each node's directory: the compiled backend
ERLC_TIMEOUT_S = 60
# messages a consumer (an ingest worker) holds unacknowledged; the rest wait in the queue
INGEST_PREFETCH = 500
# the quorum queue's bound: past it new publishes are refused (not acknowledged: the
# devices keep them), never dropped; alert on ingest lag long before
INGEST_QUEUE_MAX_MESSAGES = 1_000_000
TLS13_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
NODE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# a node's host: a DNS name (labels of letters, digits and hyphens) or an IPv4 address
NODE_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@dataclass(frozen=True)
class Node:
    """One cluster node: its Erlang node name and its ports."""

    name: str  # "ce1@localhost"
    mqtt_port: int  # MQTT over TLS (devices, the command publisher)
    amqp_port: int  # AMQP over TLS (the ingest)
    dist_port: int  # Erlang distribution (node to node)


def nodes(count: int, *, host: str = "localhost", prefix: str = "ce", mqtt_port: int = 8883,
          amqp_port: int = 5671, dist_port: int = 25672, step: int = 1) -> list[Node]:
    """``count`` nodes. ``host`` is one host, where each node takes the next ports
    (``step`` apart), or a comma-separated list of ``count`` hosts, a node on each with
    the same ports (a cluster that outlives a machine). A host with a dot (a full name or
    an IPv4 address) makes every node's name a long one (``long_names``)."""
    if not 1 <= count <= 99:
        raise ValueError("a cluster has 1 to 99 nodes, got %d" % count)
    if not NODE_NAME.fullmatch(prefix):
        raise ValueError("node prefix %r: a-z, then a-z 0-9 _ -" % prefix)
    hosts = [h.strip() for h in host.split(",")]
    for h in hosts:
        if not NODE_HOST.fullmatch(h):
            raise ValueError("node host %r: a host name or an IPv4 address" % h)
    if len(set(hosts)) != len(hosts):
        raise ValueError("node hosts repeat: %s" % host)
    if len(hosts) > 1 and len(hosts) != count:
        raise ValueError("%d node hosts for %d nodes: name one host, or one per node"
                         % (len(hosts), count))
    if len({"." in h for h in hosts}) > 1:
        raise ValueError("node hosts %s: every one a full name (with dots) or none; "
                         "Erlang does not mix long and short node names" % host)
    if len(hosts) > 1:
        return [Node("%s%d@%s" % (prefix, i + 1, h), mqtt_port, amqp_port, dist_port)
                for i, h in enumerate(hosts)]
    return [Node("%s%d@%s" % (prefix, i + 1, host), mqtt_port + i * step,
                 amqp_port + i * step, dist_port + i * step) for i in range(count)]


def long_names(names: Iterable[str]) -> bool:
    """Whether these node names are Erlang long names (a host part with a dot): the nodes
    then run with ``USE_LONGNAME`` and every ``rabbitmqctl`` call needs ``--longnames``."""
    return any("." in n.partition("@")[2] for n in names)


def routing_key(topic: str) -> str:
    """The AMQP routing key the MQTT plugin (3.10) makes of an MQTT topic: each ``/`` a
    ``.``. A ``.`` stays, so a device id with dots spans several routing-key words:
    bindings use ``#`` for the device level, and ``topic_of`` cuts the device id out
    between the fixed prefix and the two fixed last levels."""
    return topic.replace("/", ".")


def topic_of(key: str) -> str:
    """The MQTT topic of a routing key ``ce.v1.<device>.<up|down>.<kind>`` (the device id
    may hold dots; the other levels never do); other keys: dots back to slashes."""
    head = topics.PREFIX.replace("/", ".") + "."
    parts = key.rsplit(".", 2)
    if key.startswith(head) and len(parts) == 3 and len(parts[0]) > len(head):
        return "%s/%s/%s/%s" % (topics.PREFIX, parts[0][len(head):], parts[1], parts[2])
    return key.replace(".", "/")


def subscribed_device(headers: Any) -> str | None:
    """The device a ``binding.created`` event shows subscribed to its own ``down/cmd``
    (the MQTT plugin binds the device's queue to ``amq.topic`` at its SUBSCRIBE): the
    user who bound it, when that user is a device and the key is its own command topic;
    else None. A device's topic permissions let it bind only its own ``down/`` keys, and
    the event names the authenticated user: no device can announce another."""
    if not isinstance(headers, dict):
        return None
    who, key = headers.get("user_who_performed_action"), headers.get("routing_key")
    if isinstance(who, bytes):
        who = who.decode("utf-8", "replace")
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not isinstance(who, str) or not isinstance(key, str) or \
            headers.get("source_name") not in (EXCHANGE, EXCHANGE.encode()):
        return None
    if broker_acl.identity_kind(who) != broker_acl.DEVICE:
        return None
    return who if topic_of(key) == topics.down(who, "cmd") else None


def _rk(topic_filter: str) -> str:
    """A regex for the routing keys of an MQTT filter with ``+`` levels (literal
    elsewhere); a ``+`` in the device level (the third) may span words (dotted ids)."""
    out = []
    for i, level in enumerate(topic_filter.split("/")):
        if level == "+":
            out.append(".+" if i == 2 else "[^.]+")
        else:
            out.append(re.escape(level))
    return "^%s$" % r"\.".join(out)


def _any(patterns: Iterable[str]) -> str:
    return "|".join(patterns) or "^$"


def _sub_queue(cn: str) -> str:
    # the queues the MQTT plugin makes for a client's subscriptions (QoS 0 and 1)
    return "^mqtt-subscription-%sqos[01]$" % re.escape(cn)


@dataclass(frozen=True)
class Rules:
    """One identity's permissions: resources (regexes over exchange and queue names) and
    topics (regexes over ``amq.topic`` routing keys)."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


NOTHING = "^$"


def rules_for(cn: str) -> Rules:
    """What ``cn`` may do (the same grants as ``broker_acl.acls_for`` for Mosquitto);
    ValueError for a CN that names nobody."""
    kind = broker_acl.identity_kind(cn)
    exchange = "^%s$" % re.escape(EXCHANGE)
    if kind == broker_acl.DEVICE:
        queue = _sub_queue(cn)
        return Rules(configure=queue, write=_any([exchange, queue]),
                     read=_any([exchange, queue]),
                     topic_write=_rk(topics.up(cn, "+")),
                     topic_read=_rk(topics.down(cn, "+")))
    if kind == broker_acl.INGEST:  # consume the ingest queue over AMQP; its presence queue
        presence = "^%s[A-Za-z0-9_-]{1,64}$" % re.escape(PRESENCE_QUEUE_PREFIX)
        return Rules(presence, presence,
                     _any(["^%s$" % re.escape(INGEST_QUEUE), presence,
                           "^%s$" % re.escape(EVENT_EXCHANGE)]), NOTHING, NOTHING)
    if kind == broker_acl.COMMANDS:
        return Rules(NOTHING, exchange, NOTHING,
                     _any(_rk(topics.every_down(k)) for k in topics.DOWN_KINDS), NOTHING)
    if kind == broker_acl.CONTROL:  # Mosquitto's control topic: here rabbitmqctl
        return Rules(NOTHING, NOTHING, NOTHING, NOTHING, NOTHING)
    raise ValueError("%r names no broker identity (a device URN, or %s, %s or %s with an "
                     "optional -<suffix>)" % (cn, broker_acl.INGEST_CN, broker_acl.COMMANDS_CN,
                                              broker_acl.CONTROL_CN))


def definitions(identities: Iterable[str]) -> dict[str, Any]:
    """The definitions RabbitMQ loads at boot: the users ``identities`` with their rules,
    the vhost, the ingest's quorum queue and its bindings. No password anywhere (an empty
    hash refuses every password: only a certificate logs in), no guest user."""
    cns = sorted(set(identities))
    users, permissions, topic_permissions = [], [], []
    for cn in cns:
        r = rules_for(cn)
        users.append({"name": cn, "password_hash": "", "tags": [],
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "limits": {}})
        permissions.append({"user": cn, "vhost": VHOST, "configure": r.configure,
                            "write": r.write, "read": r.read})
        topic_permissions.append({"user": cn, "vhost": VHOST, "exchange": EXCHANGE,
                                  "write": r.topic_write, "read": r.topic_read})
    return {
        "users": users,
        "vhosts": [{"name": VHOST}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "queues": [{"name": INGEST_QUEUE, "vhost": VHOST, "durable": True,
                    "auto_delete": False,
                    "arguments": {"x-queue-type": "quorum",
                                  "x-max-length": INGEST_QUEUE_MAX_MESSAGES,
                                  "x-overflow": "reject-publish"}}],
        "bindings": [{"source": EXCHANGE, "vhost": VHOST, "destination": INGEST_QUEUE,
                      "destination_type": "queue",
                      "routing_key": _binding_key(topics.every_up(kind)),
                      "arguments": {}} for kind in broker_acl.INGEST_KINDS],
        "exchanges": [], "policies": [], "parameters": [], "global_parameters": [],
    }


def _binding_key(topic_filter: str) -> str:
    """``ce/v1/+/up/<kind>`` as a binding key: ``#`` for the device level (dotted ids)."""
    return ".".join("#" if i == 2 and level == "+" else level
                    for i, level in enumerate(topic_filter.split("/")))


def _erl(text: str | Path) -> str:
    """An Erlang string literal."""
    return '"%s"' % str(text).replace("\\", "\\\\").replace('"', '\\"')


def render_conf(node: Node, cluster: list[Node], *, bind: str, definitions_file: Path) -> str:
    lines = [
        "# written by `cityedge broker config --engine rabbitmq`",
        "listeners.tcp = none",
        "listeners.ssl.default = %s:%d" % (bind, node.amqp_port),
        "mqtt.listeners.tcp = none",
        "mqtt.listeners.ssl.default = %s:%d" % (bind, node.mqtt_port),
        "mqtt.ssl_cert_login = true",
        "mqtt.allow_anonymous = false",
        "mqtt.vhost = %s" % VHOST,
        "mqtt.exchange = %s" % EXCHANGE,
        "event_exchange.vhost = %s" % VHOST,
        "ssl_cert_login_from = common_name",
        "auth_mechanisms.1 = EXTERNAL",
        "loopback_users = none",
        "max_message_size = %d" % MAX_PACKET_BYTES,
        # loaded at boot only when it changed since the cluster last imported it: loaded
        # every time, a restarted node would bring back the users of devices cut since
        "definitions.import_backend = local_filesystem",
        "definitions.local.path = %s" % definitions_file.resolve(),
        "definitions.skip_if_unchanged = true",
        "cluster_formation.peer_discovery_backend = classic_config",
        *("cluster_formation.classic_config.nodes.%d = %s" % (i + 1, n.name)
          for i, n in enumerate(cluster)),
        "cluster_partition_handling = pause_minority",
    ]
    return "\n".join(lines) + "\n"


def render_advanced(files: BrokerFiles, crl_dir: Path) -> str:
    """TLS for every listener: the city CA, a client certificate required, the CRL of the
    certificate's issuer required (``crl_check peer``: no CRL for it refuses); the
    internal backend authenticates and authorizes, and ``cityedge_mqtt_client_id`` must
    authorize too (every listed authorization backend must allow); and the MQTT username
    taken whole (``ignore_colons_in_username``). ``rabbitmq.conf`` has no keys for a list
    of authorization backends, nor for the last."""
    return """%% written by `cityedge broker config --engine rabbitmq`
[{rabbit, [{ssl_options, [
    {cacertfile, %s}, {certfile, %s}, {keyfile, %s},
    {verify, verify_peer}, {fail_if_no_peer_cert, true},
    {versions, ['tlsv1.3', 'tlsv1.2']},
    {ciphers, %s},
    {crl_check, peer},
    {crl_cache, {ssl_crl_hash_dir, {internal, [{dir, %s}]}}}]},
  %% an MQTT client id must be the certificate's CN (cityedge_mqtt_client_id.erl)
  {auth_backends, [{rabbit_auth_backend_internal,
                    [rabbit_auth_backend_internal, %s]}]}]},
 %% a device id is a URN (colons): not "vhost:user", which the MQTT plugin reads otherwise
 {rabbitmq_mqtt, [{ignore_colons_in_username, true}]}].
""" % (_erl(files.cafile.resolve()), _erl(files.certfile.resolve()),
       _erl(files.keyfile.resolve()), _erl(TLS13_CIPHERS + ":" + TLS12_CIPHERS),
       _erl(crl_dir.resolve()), CLIENT_ID_MODULE)


def render_env(node: Node, node_dir: Path) -> str:
    d = node_dir.resolve()
    return "\n".join([
        "# written by `cityedge broker config --engine rabbitmq`",
        "NODENAME=%s" % node.name,
        *(["USE_LONGNAME=true"] if long_names([node.name]) else []),
        "DIST_PORT=%d" % node.dist_port,
        "CONFIG_FILE=%s" % (d / "rabbitmq.conf"),
        "ADVANCED_CONFIG_FILE=%s" % (d / "advanced.config"),
        "ENABLED_PLUGINS_FILE=%s" % (d / "enabled_plugins"),
        "MNESIA_BASE=%s" % (d / "data"),
        "LOG_BASE=%s" % (d / "log"),
        # quoted by rabbitmq-server (-pa "$RABBITMQ_SERVER_CODE_PATH"): one directory
        "SERVER_CODE_PATH=%s" % (d / CODE_DIR),
    ]) + "\n"


def env_for(node: Node, node_dir: Path) -> dict[str, str]:
    """``rabbitmq-env.conf`` as environment variables (``RABBITMQ_`` prefixed)."""
    out = {}
    for line in render_env(node, node_dir).splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out["RABBITMQ_" + key] = value
    return out


# the names Erlang's ``ssl_crl_hash_dir`` reads: OpenSSL's issuer name hash, ``.r`` and a
# number (two issuers whose names hash alike take .r0 and .r1); nothing else is kept in
# the CRL directory, so a file of this shape that the fleet's CRL no longer holds (a
# retired intermediate's) is removed
CRL_FILE_NAME = re.compile(r"[0-9a-f]{8}\.r[0-9]+")


# issuer name (DER) -> OpenSSL's hash of it: an issuer's hash never changes, and the
# reconciler asks for every CRL every round (30 s), so openssl runs once per issuer
_ISSUER_HASHES: dict[bytes, str] = {}
_ISSUER_HASHES_MAX = 64  # intermediates in service are one or two


def _issuer_hash(crl: x509.CertificateRevocationList, crl_pem: bytes) -> str:
    """OpenSSL's issuer name hash (the canonical name's SHA-1, as ``openssl crl -hash``
    prints it; asked of openssl rather than re-implemented)."""
    name = crl.issuer.public_bytes()
    known = _ISSUER_HASHES.get(name)
    if known is not None:
        return known
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    out = subprocess.run([openssl, "crl", "-hash", "-noout"], input=crl_pem,
                         capture_output=True, check=True, timeout=30)
    h = out.stdout.decode().strip()
    if len(_ISSUER_HASHES) >= _ISSUER_HASHES_MAX:
        _ISSUER_HASHES.clear()
    _ISSUER_HASHES[name] = h
    return h


def crl_hash_files(crl_pem: Path) -> list[tuple[str, bytes]]:
    """Each CRL of the fleet's file (one per intermediate in service: two during a
    rollover's overlap) as ``(name, PEM)`` under the name Erlang's ``ssl_crl_hash_dir``
    looks for, ``<issuer hash>.r<n>``. ValueError when the file holds no CRL."""
    out: list[tuple[str, bytes]] = []
    taken: dict[str, int] = {}
    for crl in load_crls(crl_pem.read_bytes()):
        pem = crl.public_bytes(Encoding.PEM)
        h = _issuer_hash(crl, pem)
        n = taken.get(h, 0)
        taken[h] = n + 1
        out.append(("%s.r%d" % (h, n), pem))
    return out


def compile_client_id_module() -> bytes:
    """``cityedge_mqtt_client_id.erl`` compiled by ``erlc`` (Erlang's compiler, in Debian's
    ``erlang-base``, which RabbitMQ needs anyway); ValueError when it is missing or the
    compile fails."""
    erlc = shutil.which("erlc")
    if erlc is None:
        raise ValueError("erlc not found: the RabbitMQ configuration compiles its client-id "
                         "check; install Erlang (Debian: erlang-base, which rabbitmq-server "
                         "depends on) where you run `cityedge broker config`")
    with tempfile.TemporaryDirectory(prefix="cityedge-erlc-") as tmp:
        out = subprocess.run([erlc, "-o", tmp, str(CLIENT_ID_SOURCE)],
                             capture_output=True, text=True, timeout=ERLC_TIMEOUT_S)
        if out.returncode != 0:
            raise ValueError("erlc could not compile %s: %s"
                             % (CLIENT_ID_SOURCE, (out.stdout + out.stderr).strip()))
        return (Path(tmp) / (CLIENT_ID_MODULE + ".beam")).read_bytes()


def install_crl(crl_pem: Path, crl_dir: Path) -> list[Path]:
    """Put every CRL of the fleet's file where every node reads it on each handshake (each
    atomically, under its issuer's hash name), and remove the CRLs of issuers the file no
    longer holds; returns the files written."""
    crl_dir.mkdir(parents=True, exist_ok=True)
    wanted = crl_hash_files(crl_pem)
    paths = []
    for name, pem in wanted:
        write_atomic(crl_dir / name, pem, 0o644)
        paths.append(crl_dir / name)
    keep = {name for name, _ in wanted}
    for old in crl_dir.iterdir():
        if CRL_FILE_NAME.fullmatch(old.name) and old.name not in keep:
            old.unlink()
    return paths


def write(out_dir: Path, files: BrokerFiles, cluster: list[Node], *, bind: str,
          identities: Iterable[str]) -> list[Path]:
    """Write one directory per node and the shared definitions and CRL directory into
    ``out_dir``; returns the nodes' directories."""
    out_dir.mkdir(parents=True, exist_ok=True)
    defs = out_dir / DEFINITIONS_FILE
    write_atomic(defs, (json.dumps(definitions(identities), indent=1, sort_keys=True)
                        + "\n").encode(), 0o644)  # names and rules: no secrets
    crl_dir = out_dir / CRL_DIR
    install_crl(files.crlfile, crl_dir)
    beam = compile_client_id_module()
    dirs = []
    for node in cluster:
        d = out_dir / ("node-%s" % node.name.split("@")[0])
        d.mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(render_conf(node, cluster, bind=bind,
                                                     definitions_file=defs))
        (d / "advanced.config").write_text(render_advanced(files, crl_dir))
        (d / "enabled_plugins").write_text("[%s].\n" % ",".join(PLUGINS))
        (d / "rabbitmq-env.conf").write_text(render_env(node, d))
        (d / CODE_DIR).mkdir(exist_ok=True)
        write_atomic(d / CODE_DIR / (CLIENT_ID_MODULE + ".beam"), beam, 0o644)
        dirs.append(d)
    return dirs
