"""Faults during provisioning, each ending with a clear message and a consistent state on
both sides, and a re-run that finishes the job: the cable pulled at any step (hypothesis
over the step), the fleet down, a revoked login token, the broker down in the self-test."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from cli_support import check_expected, run_cli
from device_pty import DeviceFactory, PtyDevice
from fleet_server import FleetServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, select

from cityedge_core import frame
from cityedge_fleet.models import ApiToken, Credential, Device
from cityedge_provision.errors import LinkError
from cityedge_provision.fleet_client import FleetClient, Workspace
from cityedge_provision.limits import ProvisionLimits
from cityedge_provision.session import STEPS, Options, ProvisionSession
from cityedge_provision.transport import SerialTransport

from support.mosquitto import Mosquitto

FAST = ProvisionLimits(reply_timeout_s=3.0, open_timeout_s=3.0, self_test_s=10)
_numbers = itertools.count(200)


def credentials(fleet: FleetServer, device: str) -> list[Credential]:
    with Session(fleet.app.state.engine) as s:
        return list(s.exec(select(Credential).where(Credential.device_id == device)).all())


def hello(port: str) -> dict[int, Any]:
    with SerialTransport(port, FAST) as t:
        return t.request(frame.T_HELLO)


def run_session(dev: PtyDevice, ws: Workspace, fleet: FleetServer, token: str,
                pull_at: str | None = None) -> Any:
    client = FleetClient(fleet.url, token)
    with SerialTransport(dev.port, FAST) as t:
        armed = {"on": False}

        def on_start(name: str) -> None:
            if name == pull_at:
                armed["on"] = True

        t.ensure_connected()
        assert t._line is not None
        real_write = t._line.write

        def write(data: bytes) -> int | None:
            n = real_write(data)
            if armed["on"]:  # the request left; the cable goes before the answer
                dev.kill()
            return n

        t._line.write = write  # type: ignore[method-assign]
        try:
            return ProvisionSession(t, ws, client, Options(site="harbour"), on_start=on_start,
                                    limits=FAST).run()
        finally:
            client.close()


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(STEPS))
@example(pull_at="connect")
@example(pull_at="key")
@example(pull_at="csr")
@example(pull_at="enroll")
@example(pull_at="install")
@example(pull_at="self_test")
@example(pull_at="lock")
def test_cable_pulled_at_any_step_then_rerun_completes(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path, pull_at: str) -> None:
    n = next(_numbers)
    serial, urn = "SN-%05d" % n, "urn:dev:mac:0024befffe80%04x" % n
    ws = Workspace(tmp_path / ("laptop-%d" % n))
    token = fleet.token(name="tech-%d" % n)
    dev = make_device(serial, urn)
    with pytest.raises(LinkError):
        run_session(dev, ws, fleet, token, pull_at=pull_at)
    # consistent after the failure: at most one certificate, and only for the device's key
    root = dev.root
    creds = credentials(fleet, urn)
    assert len(creds) <= 1
    if creds:  # the laptop holds what the fleet issued, so the re-run can finish with it
        record = ws.session(serial)
        assert record is not None and record["kid"] == creds[0].kid
        assert record["enrollment"]["config"]["kid"] == creds[0].kid
    if (root / "config.json").exists():
        assert (root / "key.der").exists() and (root / "cert.der").exists()
    again = make_device(serial, urn, root=root)  # plugged in again, same flash
    outcome = run_session(again, ws, fleet, token)
    assert outcome.status == "provisioned"
    creds = credentials(fleet, urn)
    after = hello(again.port)
    assert after[frame.F_STATE] == "locked"
    assert [c.kid for c in creds] == [after[frame.F_KID].hex()]  # no dangling credential
    assert ws.session(serial) is None


def test_fleet_down_leaves_the_device_untouched(make_device: DeviceFactory, fleet: FleetServer,
                                                tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    fleet.stop()
    dev = make_device("SN-00301", "urn:dev:mac:0024befffe800301")
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 1
    check_expected("fleet_down", res.output)
    assert hello(dev.port)[frame.F_STATE] == "unprovisioned"


def test_revoked_login_token_says_log_in_again(make_device: DeviceFactory, fleet: FleetServer,
                                               tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    token = fleet.token(name="leaver")
    Workspace(home).save_login(fleet.url, token)
    with Session(fleet.app.state.engine) as s:
        row = s.exec(select(ApiToken).where(ApiToken.name == "leaver")).one()
        row.revoked = True
        s.add(row)
        s.commit()
    dev = make_device("SN-00302", "urn:dev:mac:0024befffe800302")
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 1
    check_expected("token_revoked", res.output)
    assert hello(dev.port)[frame.F_STATE] == "unprovisioned"
    with Session(fleet.app.state.engine) as s:
        assert s.get(Device, "urn:dev:mac:0024befffe800302") is None


def test_not_logged_in(make_device: DeviceFactory, tmp_path: Path) -> None:
    dev = make_device("SN-00303", "urn:dev:mac:0024befffe800303")
    res = run_cli(["provision", "--port", dev.port, "--yes"], tmp_path / "laptop")
    assert res.exit_code == 1
    check_expected("not_logged_in", res.output)


def test_broker_down_at_enrollment_then_rerun_resumes(
        make_device: DeviceFactory, fleet: FleetServer, mosquitto: Mosquitto,
        tmp_path: Path) -> None:
    """The fleet cannot grant the device at a broker that is down, so it enrolls nothing
    (a certificate the broker would silently refuse would lose the device's first
    batches): the technician is told to run again, and the rerun finishes."""
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    urn = "urn:dev:mac:0024befffe800304"
    dev = make_device("SN-00304", urn)
    mosquitto.stop()
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 1
    check_expected("enroll_broker_down", res.output)
    assert hello(dev.port)[frame.F_STATE] == "keyed"  # open, its key kept
    assert len(credentials(fleet, urn)) == 0
    mosquitto.start()
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 0, res.output
    check_expected("enroll_resumed", res.output)
    assert len(credentials(fleet, urn)) == 1
    assert hello(dev.port)[frame.F_STATE] == "locked"
