"""``cityedge hw upload`` against the real fleet service (uvicorn on a loopback port, SQLite):
a vendor's report is stored; a report the fleet would refuse is refused before anything is
sent; another vendor's model is the fleet's 403 in one line with what to do; a token is
never taken from the command line, and plain http goes only to this machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlmodel import Session, func, select

from cityedge_fleet.app import create_app
from cityedge_fleet.auth import create_api_token
from cityedge_fleet.config import Settings
from cityedge_fleet.hw_report_store import register_model
from cityedge_fleet.models import AuditRecord, HwReport, Role

from support import cli
from support.hw_reports import encode, make_report
from support.mosquitto import free_port

START_TIMEOUT_S = 10.0


class Fleet:
    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings, init_db=True)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="fleet")

    def vendor_token(self, vendor: str) -> str:
        with Session(self.app.state.engine) as session:
            _, token = create_api_token(session, name="vendor-%s" % vendor, role=Role.vendor,
                                        created_by="test", vendor=vendor)
            register_model(session, name="ce-air-1", vendor="acme", registered_by="test")
            register_model(session, name="gx-noise-2", vendor="globex", registered_by="test")
            session.commit()
        return token

    def count(self, table: type[HwReport] | type[AuditRecord]) -> int:
        with Session(self.app.state.engine) as session:
            return session.exec(select(func.count()).select_from(table)).one()


@pytest.fixture
def fleet(ca_dirs: tuple[Path, Path], tmp_path: Path) -> Iterator[Fleet]:
    online = tmp_path / "ca"
    shutil.copytree(ca_dirs[1], online)
    settings = Settings(mode="development",
                        database_url="sqlite:///%s" % (tmp_path / "fleet.sqlite3"),
                        ca_dir=online, ingest_with_serve=False,
                        audit_key_file=tmp_path / "audit.key",
                        command_key_file=tmp_path / "command.key")
    f = Fleet(settings)
    f.thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not f.server.started:
        assert time.monotonic() < deadline and f.thread.is_alive(), "the fleet did not start"
        time.sleep(0.02)
    yield f
    f.server.should_exit = True
    f.thread.join(timeout=10)
    f.app.state.engine.dispose()


def hw_upload(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CITYEDGE_FLEET_TOKEN"}
    if token is not None:
        env["CITYEDGE_FLEET_TOKEN"] = token
    return cli.run(["hw", "upload", *args], env)  # in process (support.cli), stdin empty


def test_a_vendor_uploads_its_report(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(encode(make_report("ce-air-1")))
    done = hw_upload(str(path), "--fleet", fleet.url, token=fleet.vendor_token("acme"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("report 1 stored for ce-air-1, profile city-baseline: met "
                           "(sha256 %s)\n" % hashlib.sha256(path.read_bytes()).hexdigest())
    assert fleet.count(HwReport) == 1


def test_a_forged_report_is_refused_before_anything_is_sent(fleet: Fleet,
                                                            tmp_path: Path) -> None:
    token = fleet.vendor_token("acme")
    audit_rows = fleet.count(AuditRecord)
    first = make_report("ce-air-1")["requirements"][0]["id"]
    path = tmp_path / "report.json"
    path.write_bytes(encode(make_report("ce-air-1", outcomes={first: "fail"}, met=True)))
    done = hw_upload(str(path), "--fleet", fleet.url, token=token)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0] == ("cityedge: %s: the fleet would refuse this report: summary.met is "
                        "true but the outcomes make it false (met: every requirement pass "
                        "or not applicable)" % path)
    assert lines[1].startswith("  what to do: run `cityedge hw check` again")
    assert (fleet.count(HwReport), fleet.count(AuditRecord)) == (0, audit_rows)


def test_another_vendors_model_is_one_line_and_what_to_do(fleet: Fleet,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(encode(make_report("gx-noise-2")))
    done = hw_upload(str(path), "--fleet", fleet.url, token=fleet.vendor_token("acme"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "cityedge: the fleet refused: device model gx-noise-2 is not registered to your "
        "vendor",
        "  what to do: the city's security team registers your device models to your "
        "vendor; ask them, naming the model"]
    assert fleet.count(HwReport) == 0


def test_no_token_and_plain_http_elsewhere_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(encode(make_report("ce-air-1")))
    done = hw_upload(str(path), "--fleet", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == "cityedge: no API token: set CITYEDGE_FLEET_TOKEN"
    done = hw_upload(str(path), "--fleet", "http://fleet.example.org", token="x")
    assert done.returncode == 1
    assert done.stderr.splitlines()[0].startswith(
        "cityedge: refusing fleet URL 'http://fleet.example.org': use https://")


def test_create_token_makes_a_vendor_token_that_names_its_vendor(
        fleet: Fleet, tmp_path: Path) -> None:
    env = dict(os.environ, CITYEDGE_MODE="development",
               CITYEDGE_DATABASE_URL=str(fleet.app.state.settings.database_url),
               CITYEDGE_CA_DIR=str(fleet.app.state.settings.ca_dir),
               CITYEDGE_AUDIT_KEY_FILE=str(fleet.app.state.settings.audit_key_file),
               CITYEDGE_COMMAND_KEY_FILE=str(fleet.app.state.settings.command_key_file))

    def create_token(*args: str) -> subprocess.CompletedProcess[str]:
        return cli.run(["fleet", "create-token", "--name", "acme-reports", "--role",
                        "vendor", *args], env, cwd=tmp_path)  # in process (support.cli)

    missing = create_token()
    assert missing.returncode == 1
    assert missing.stderr.startswith("cityedge: create-token: a vendor token names its vendor")
    made = create_token("--vendor", "acme")
    assert made.returncode == 0, made.stderr
    assert "(vendor for vendor acme) printed once" in made.stderr
    fleet.vendor_token("acme")  # registers the models
    path = tmp_path / "report.json"
    path.write_bytes(encode(make_report("ce-air-1")))
    done = hw_upload(str(path), "--fleet", fleet.url, "--json", token=made.stdout.strip())
    assert done.returncode == 0, done.stderr
    assert '"uploaded_by": "acme-reports"' in done.stdout
