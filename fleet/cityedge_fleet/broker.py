"""Mosquitto configuration for the fleet: what ``cityedge broker config`` writes.

``mosquitto.conf``: a TLS listener that demands a client certificate from the city CA,
takes the certificate's CN as the MQTT username (``use_identity_as_username``) and as the
client id (``use_username_as_clientid``: nobody takes over another client's session by
naming its client id), checks the CRL the fleet publishes, and hands every authorization
decision to Mosquitto's dynamic security plugin (Debian's ``mosquitto`` package ships it).

``dynamic-security.json``: the plugin's first state, every rule from ``broker_acl``:
everything denied by default, one role per identity (the fleet's services and every device
that may connect now). The plugin owns the file once the broker runs (it rewrites it on
every change); the fleet keeps it in step with the registry over the plugin's control
topic (``broker_sync``). All paths are absolute, so the broker starts from any directory.

The broker saves its state (``persistence``): the ingest's session, with its plain
subscriptions and the messages queued for it, outlives a restart (Mosquitto 2.0 saves no
shared subscription: docs/OPERATIONS.md section 8).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cityedge_fleet import broker_acl
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

DYNSEC_FILE = "dynamic-security.json"
# where Debian (and Ubuntu) install the plugin; `broker config --plugin` for elsewhere
DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


class BrokerConfigError(UserError, ValueError):
    """The broker's configuration cannot be written as asked (missing plugin, bad name)."""


@dataclass(frozen=True)
class BrokerFiles:
    cafile: Path  # every intermediate in service + the root (``<ca_dir>/broker-ca.pem``)
    certfile: Path  # the broker's server certificate
    keyfile: Path  # the broker's server key
    crlfile: Path  # the fleet's CRL (``<ca_dir>/crl.pem``)


def find_dynsec_plugin() -> Path:
    for candidate in DYNSEC_PLUGIN_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise BrokerConfigError(
        "Mosquitto's dynamic security plugin (mosquitto_dynamic_security.so) is not in %s; "
        "install Debian's mosquitto package or name it with --plugin"
        % ", ".join(DYNSEC_PLUGIN_PATHS))


def dynsec_config(identities: Iterable[str], share_group: str) -> dict[str, Any]:
    """The plugin's state granting ``identities`` (CNs) their rules and nothing else."""
    cns = sorted(set(identities))
    for cn in cns:
        broker_acl.acls_for(cn, share_group)  # ValueError for a CN that names nobody
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": False},
        "clients": [broker_acl.client_json(cn) for cn in cns],
        "groups": [],
        "roles": [broker_acl.role_json(cn, share_group) for cn in cns],
    }


# the TLS 1.2 suites the broker offers: ECDHE (forward secrecy) with an AEAD cipher only.
# OpenSSL's default list also has CBC suites with a SHA-1 MAC, which the city's guideline
# CE-NET-01 refuses (`cityedge hw net` finds them); TLS 1.3 suites are all AEAD already.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"))

# the largest MQTT packet the broker takes from anyone (a batch is at most
# cityedge_core.limits.BATCH_MAX_BYTES; a gateway's status and a command are smaller): a
# client that sends more is disconnected instead of costing the broker its size in memory
MAX_PACKET_BYTES = 65536
# QoS 1 messages the broker queues per client beyond those in flight. Mosquitto *drops*
# messages for a client whose queue is full (its default is 1000) although their
# publishers were acknowledged: the ingest's session must hold a long outage of the
# ingest (a batch is ~850 B: a million is ~0.85 GB of payload; alert on ingest lag long
# before that). The limit is one for every client (Mosquitto 2.0 has no per-client one).
MAX_QUEUED_MESSAGES = 1_000_000
# ... and bytes of payload so queued per client: the bound on broker memory whatever the
# messages' sizes. Without it a device with a valid certificate could, while the ingest is
# away, queue a million packets of MAX_PACKET_BYTES into the ingest's session: 64 GiB
# (docs/SECURITY.md, "Broker queues"). Once it is reached Mosquitto drops what comes next
# for that client (acknowledged to devices): size it to the broker's memory, and keep the
# ingest's lag alerts (docs/OPERATIONS.md section 8) well below it.
MAX_QUEUED_BYTES = 1 << 30
# where Debian's mosquitto package keeps its state (owned by the `mosquitto` user)
PERSISTENCE_DIR = Path("/var/lib/mosquitto")
# seconds between saves of the broker's state. A graceful stop (SIGTERM: `systemctl
# restart`) always saves everything; a crash (kill -9, power) loses what changed since
# the last save: the ingest's queue and, on a broker that has not saved since it started,
# the ingest's session itself (docs/OPERATIONS.md section 8). Mosquitto's default is 1800.
AUTOSAVE_INTERVAL_S = 60


def render(files: BrokerFiles, *, port: int, bind: str, plugin: Path, dynsec_file: Path,
           pid_file: Path | None = None, extra: Iterable[str] = (),
           max_queued_messages: int = MAX_QUEUED_MESSAGES,
           max_queued_bytes: int = MAX_QUEUED_BYTES, user: str | None = None,
           persistence_dir: Path | None = None,
           autosave_interval_s: int = AUTOSAVE_INTERVAL_S) -> str:
    """``persistence_dir`` None: no persistence lines (a test broker that says its own)."""
    lines = [
        "# written by `cityedge broker config`",
        "per_listener_settings false",
        "allow_anonymous false",
        "plugin %s" % plugin.resolve(),
        "plugin_opt_config_file %s" % dynsec_file.resolve(),
        "max_packet_size %d" % MAX_PACKET_BYTES,
        "# what the broker keeps for one client that is away or slow (the ingest), by count",
        "# and by bytes; past either it drops what comes next although it acknowledged it",
        "# (docs/OPERATIONS.md section 8; the bytes bound: docs/SECURITY.md)",
        "max_queued_messages %d" % max_queued_messages,
        "max_queued_bytes %d" % max_queued_bytes,
    ]
    if persistence_dir is not None:
        # the ingest's session (its plain subscriptions and every message queued for it)
        # outlives a broker restart only if the broker saves it
        lines += [
            "# save sessions, their plain subscriptions (never a shared one) and queued",
            "# messages at every stop and every autosave_interval seconds: a crash loses",
            "# what changed since the last save (docs/OPERATIONS.md section 8)",
            "persistence true",
            "persistence_location %s/" % persistence_dir.resolve(),
            "autosave_interval %d" % autosave_interval_s,
        ]
    if user is not None:  # started as root, the broker runs as this user
        lines.append("user %s" % user)
    if pid_file is not None:
        lines.append("pid_file %s" % pid_file.resolve())
    lines += list(extra)
    lines += [
        "listener %d %s" % (port, bind),
        "cafile %s" % files.cafile.resolve(),
        "certfile %s" % files.certfile.resolve(),
        "keyfile %s" % files.keyfile.resolve(),
        "crlfile %s" % files.crlfile.resolve(),
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "ciphers %s" % TLS12_CIPHERS,
    ]
    return "\n".join(lines) + "\n"


def write_dynsec(path: Path, identities: Iterable[str], share_group: str) -> Path:
    """Write the plugin's state file (the broker rewrites it itself once running)."""
    data = json.dumps(dynsec_config(identities, share_group), indent=1, sort_keys=True)
    write_atomic(path, (data + "\n").encode(), 0o644)  # no secrets: usernames and rules
    return path


def write(out_dir: Path, files: BrokerFiles, *, port: int, bind: str,
          identities: Iterable[str], share_group: str, plugin: Path | None = None,
          pid_file: Path | None = None, user: str | None = None,
          persistence_dir: Path = PERSISTENCE_DIR,
          max_queued_bytes: int = MAX_QUEUED_BYTES) -> Path:
    """Write ``mosquitto.conf`` and ``dynamic-security.json`` into ``out_dir``; returns the
    config path. ``identities``: the CNs the broker lets in (services and devices)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dynsec = write_dynsec(out_dir / DYNSEC_FILE, identities, share_group)
    conf = out_dir / "mosquitto.conf"
    conf.write_text(render(files, port=port, bind=bind, plugin=plugin or find_dynsec_plugin(),
                           dynsec_file=dynsec, pid_file=pid_file, user=user,
                           persistence_dir=persistence_dir,
                           max_queued_bytes=max_queued_bytes))
    conf.chmod(0o644)
    return conf
