"""The real fleet service for provisioning tests: FastAPI under uvicorn on a free loopback
port (a thread of the test process), SQLite in a temp dir, and a CA whose intermediate is
the test PKI's CA, so the test Mosquitto trusts the certificates the fleet issues."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from sqlmodel import Session

from cityedge_fleet.app import create_app
from cityedge_fleet.auth import create_api_token
from cityedge_fleet.command_key import trust_store
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker
from cityedge_fleet.models import Role

from support.fleet_ca import fleet_ca_from_pki
from support.mosquitto import TestPKI, free_port

START_TIMEOUT_S = 10.0


class FleetServer:
    def __init__(self, base: Path, pki: TestPKI, broker_port: int, port: int | None = None,
                 tls: bool = False) -> None:
        """``port``: listen there (a fleet restarted on the same URL), else a free one.
        ``tls``: HTTPS with the test PKI's server certificate (CN/SAN 127.0.0.1)."""
        self.dir = base
        self.db_path = base / "fleet.sqlite3"
        ingest = pki.issue_client("fleet-ingest")
        control = pki.service("fleet-control")  # enrollment grants devices at the broker
        self.settings = Settings(
            mode="development", database_url="sqlite:///%s" % self.db_path,
            ca_dir=fleet_ca_from_pki(pki, base / "ca"),
            broker_url="mqtts://127.0.0.1:%d" % broker_port, ingest_with_serve=False,
            mqtt_port=broker_port, mqtt_ca_file=pki.ca_pem, mqtt_cert_file=ingest.cert_pem,
            mqtt_key_file=ingest.key_pem, broker_control_cert_file=control.cert_pem,
            broker_control_key_file=control.key_pem,
            audit_key_file=base / "audit.key", command_key_file=base / "command.key",
            # many devices from one test client address: no enrollment rate limit here
            limits=FleetLimits(enroll_burst=10_000, enroll_per_s=1000.0))
        self.worker: MqttIngestWorker | None = None
        self.app = create_app(self.settings, init_db=True)
        self.port = port or free_port()
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        ssl_files = {"ssl_certfile": str(pki.server.cert_pem),
                     "ssl_keyfile": str(pki.server.key_pem)} if tls else {}
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off",
                                                    **ssl_files))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="fleet")

    def start(self) -> FleetServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fleet service did not start on port %d" % self.port)
            time.sleep(0.02)
        return self

    def trust_store(self) -> list[bytes]:
        """The fleet's command keys, as a device must trust them (SEC1 points)."""
        return [bytes.fromhex(k) for k in trust_store(self.app.state.command_key.current())]

    def token(self, role: Role = Role.technician, name: str = "tech") -> str:
        with Session(self.app.state.engine) as session:
            _, tok = create_api_token(session, name=name, role=role, created_by="test")
            session.commit()
        return tok

    def start_ingest(self) -> MqttIngestWorker:
        """The ingest worker: verifies batches from the broker into the fleet database."""
        self.worker = MqttIngestWorker(Ingestor(self.app.state.engine, self.settings),
                                       self.settings).start()
        if not self.worker.subscribed.wait(START_TIMEOUT_S):
            raise RuntimeError("the ingest worker did not subscribe")
        return self.worker

    def stop(self) -> None:
        self.app.state.broker_access.close()
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.engine.dispose()


def installed_fleet_keys(root: Path, cfg: dict[str, Any]) -> list[bytes]:
    """The fleet keys a device installed (its config.json names their files)."""
    return [(root / Path(p).name).read_bytes() for p in cfg["fleet_keys"]]
