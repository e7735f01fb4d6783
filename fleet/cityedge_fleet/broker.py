"""Mosquitto configuration for the fleet: what ``cityedge broker config`` writes.

A TLS listener that demands a client certificate from our CA, takes the certificate's CN
as the MQTT username (so the ACL's ``%u`` is the device id), checks the CRL the fleet
publishes, and an ACL where a device may write only its own ``up/`` topics and read only
its own ``down/`` topics. The fleet's own services connect with certificates whose CN is
``fleet-ingest`` (reads every device's readings, shared subscriptions included) or
``fleet-commands`` (writes commands). Mosquitto re-reads the CRL on SIGHUP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ACL = """\
# written by `cityedge broker config`: devices are their certificate CN (%u)
pattern write ce/v1/%u/up/#
pattern read ce/v1/%u/down/#
user fleet-ingest
topic read ce/v1/+/up/#
topic read $share/+/ce/v1/+/up/#
user fleet-commands
topic write ce/v1/+/down/#
"""


@dataclass(frozen=True)
class BrokerFiles:
    cafile: Path  # CA bundle that issued device certificates (intermediate + root)
    certfile: Path  # the broker's server certificate
    keyfile: Path  # the broker's server key
    crlfile: Path  # the fleet's CRL (``<ca_dir>/crl.pem``)


def render(files: BrokerFiles, *, port: int, bind: str, acl_file: Path,
           pid_file: Path | None = None) -> str:
    lines = [
        "# written by `cityedge broker config`",
        "per_listener_settings false",
        "allow_anonymous false",
        "acl_file %s" % acl_file,
    ]
    if pid_file is not None:
        lines.append("pid_file %s" % pid_file)
    lines += [
        "listener %d %s" % (port, bind),
        "cafile %s" % files.cafile,
        "certfile %s" % files.certfile,
        "keyfile %s" % files.keyfile,
        "crlfile %s" % files.crlfile,
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
    ]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, files: BrokerFiles, *, port: int, bind: str,
          pid_file: Path | None = None) -> Path:
    """Write ``mosquitto.conf`` and ``acl`` into ``out_dir``; returns the config path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    acl = out_dir / "acl"
    acl.write_text(ACL)
    acl.chmod(0o644)
    conf = out_dir / "mosquitto.conf"
    conf.write_text(render(files, port=port, bind=bind, acl_file=acl, pid_file=pid_file))
    conf.chmod(0o644)
    return conf
