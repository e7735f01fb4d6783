"""``cityedge provision`` end to end: the real firmware on the MicroPython unix port with its
UART on a pty, the real fleet service (SQLite, uvicorn) and the real TLS Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cli_support import check_expected, run_cli
from device_pty import DeviceFactory, boot_agent
from fleet_server import FleetServer, installed_fleet_keys
from sqlmodel import Session, select

from cityedge_fleet.models import Credential, Device, IngestEvent, Reading
from cityedge_provision.fleet_client import Workspace

URN = "urn:dev:mac:0024befffe800101"


def login(fleet: FleetServer, home: Path, token: str | None = None) -> None:
    Workspace(home).save_login(fleet.url, token or fleet.token())


def test_provision_one_device_under_a_minute(make_device: DeviceFactory, fleet: FleetServer,
                                             tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    login(fleet, home)
    dev = make_device("SN-00101", URN)
    t0 = time.monotonic()
    res = run_cli(["provision", "--port", dev.port, "--site", "harbour", "--yes",
                   "--label", str(tmp_path / "label.png")], home)
    elapsed = time.monotonic() - t0
    assert res.exit_code == 0, res.output
    assert elapsed < 60, elapsed
    check_expected("provision_ok", res.output)
    with Session(fleet.app.state.engine) as s:
        device = s.get(Device, URN)
        assert device is not None and device.state == "provisioned" and device.site == "harbour"
        creds = s.exec(select(Credential).where(Credential.device_id == URN)).all()
        assert len(creds) == 1
    cfg = json.loads((dev.root / "config.json").read_text())
    assert cfg["fleet"]["device_id"] == URN and cfg["fleet"]["kid"] == creds[0].kid
    assert installed_fleet_keys(dev.root, cfg) == fleet.trust_store()
    assert (tmp_path / "label.png").stat().st_size > 1000
    assert Workspace(home).session("SN-00101") is None  # finished: no session left
    log = (home / "provisioned.jsonl").read_text()
    assert URN in log and creds[0].kid in log


def test_already_provisioned_device_is_refused_clearly(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    login(fleet, home)
    dev = make_device("SN-00102", "urn:dev:mac:0024befffe800102")
    assert run_cli(["provision", "--port", dev.port, "--yes"], home).exit_code == 0
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 1
    check_expected("provision_locked", res.output)


def test_answering_no_changes_nothing(make_device: DeviceFactory, fleet: FleetServer,
                                      tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    login(fleet, home)
    dev = make_device("SN-00103", "urn:dev:mac:0024befffe800103")
    res = run_cli(["provision", "--port", dev.port], home, input="n\n")
    assert res.exit_code == 1
    check_expected("provision_cancelled", res.output)
    with Session(fleet.app.state.engine) as s:
        assert s.get(Device, "urn:dev:mac:0024befffe800103") is None
    assert not (dev.root / "key.der").exists()


def test_provisioned_device_streams_verified_readings(
        make_device: DeviceFactory, fleet: FleetServer, fw_mpy: Path, tmp_path: Path) -> None:
    """After `cityedge provision`, the real agent boots from what was installed and the
    fleet's ingest verifies its batches (the self-test batch is seq 1 of the same chain)."""
    fleet.start_ingest()
    home = tmp_path / "laptop"
    login(fleet, home)
    urn = "urn:dev:mac:0024befffe800111"
    dev = make_device("SN-00111", urn)
    res = run_cli(["provision", "--port", dev.port, "--yes", "--site", "park"], home)
    assert res.exit_code == 0, res.output
    dev.stop()
    result = boot_agent(json.loads((dev.root / "config.json").read_text()), fw_mpy, tmp_path)
    # the agent stops once 2 batches are signed and every stored one acknowledged; a busy
    # machine lets it sign more before that holds: the guarantee is one unbroken chain from
    # the self-test batch (1) to the last acknowledged, all of it verified by the fleet
    last = result["seq"]
    assert last >= 3 and result["stored"] == 0, result
    want = set(range(1, last + 1))

    def verified() -> list[Reading]:
        with Session(fleet.app.state.engine) as s:
            return list(s.exec(select(Reading).where(Reading.device_id == urn)).all())

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and {r.batch_seq for r in verified()} != want:
        time.sleep(0.1)
    rows = verified()
    with Session(fleet.app.state.engine) as s:
        events = [(e.status, e.seq, e.detail) for e in s.exec(select(IngestEvent)).all()]
        events.append([(c.kid, c.status, c.device_id) for c in s.exec(select(Credential)).all()])
    assert {r.batch_seq for r in rows} == want, (events, result)
    assert all(r.status == "ok" for r in rows), {r.status for r in rows}
    assert any(r.name.endswith("selftest") for r in rows)
    with Session(fleet.app.state.engine) as s:
        device = s.get(Device, urn)
        assert device is not None and device.state == "active"


def test_technician_command_as_a_process_under_a_minute(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    """The installed ``cityedge`` command, as the technician runs it: wall time including
    the interpreter start, the fleet round trips and the device's self-test."""
    home = tmp_path / "laptop"
    login(fleet, home)
    dev = make_device("SN-00121", "urn:dev:mac:0024befffe800121")
    cityedge = Path(sys.executable).with_name("cityedge")
    t0 = time.monotonic()
    proc = subprocess.run([str(cityedge), "provision", "--port", dev.port, "--yes"],
                          env=dict(os.environ, CITYEDGE_HOME=str(home)),
                          capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60, elapsed
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("  ✓ ")]
    assert [ln.split()[1] for ln in steps] == ["connect", "fleet", "key", "csr", "enroll",
                                               "install", "self_test", "lock"]
    print("provisioning wall time: %.2f s" % elapsed)
