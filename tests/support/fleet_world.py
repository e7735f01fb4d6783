"""A fleet's world for tests against the real broker: a directory, the fleet's CA made from
the test PKI (its CRL written), a Mosquitto that loads that CRL, and the fleet's settings
with its three service identities (ingest, control, commands). The caller makes the app
and cleans up (``broker.cleanup()``, the directory)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import FleetLimits, Settings

from support.fleet_ca import fleet_ca_from_pki
from support.mosquitto import Mosquitto, TestPKI


@dataclass
class FleetWorld:
    dir: Path
    broker: Mosquitto
    settings: Settings


def fleet_world(pki: TestPKI, db_url: str | None, prefix: str, *, persistence: bool = False,
                **limits: Any) -> FleetWorld:
    """``db_url`` None: SQLite in the world's directory. ``limits``: FleetLimits fields
    (the broker control timeout is 10 s unless given: a busy machine). ``persistence``:
    the broker keeps its sessions and queued messages across a restart."""
    world = Path(tempfile.mkdtemp(prefix=prefix))
    world.chmod(0o755)
    ca_dir = fleet_ca_from_pki(pki, world / "ca")
    ca_dir.chmod(0o755)
    ca = CertificateAuthority(ca_dir)
    ca.write_crl([], 86400)
    broker = Mosquitto(pki, crl_file=ca.crl_path, persistence=persistence).start()
    control, ingest = pki.service("fleet-control"), pki.service("fleet-ingest")
    commands = pki.service("fleet-commands")
    settings = Settings(
        mode="development", database_url=db_url or "sqlite:///%s" % (world / "fleet.sqlite3"),
        ca_dir=ca_dir, broker_url="mqtts://127.0.0.1:%d" % broker.port,
        broker_pid_file=broker.pid_file, mqtt_port=broker.port, mqtt_ca_file=pki.ca_pem,
        mqtt_cert_file=ingest.cert_pem, mqtt_key_file=ingest.key_pem,
        broker_control_cert_file=control.cert_pem, broker_control_key_file=control.key_pem,
        commands_cert_file=commands.cert_pem, commands_key_file=commands.key_pem,
        ingest_with_serve=False, audit_key_file=world / "audit.key",
        command_key_file=world / "command.key",
        limits=FleetLimits(**{"broker_control_timeout_s": 10.0, **limits}))
    return FleetWorld(world, broker, settings)
