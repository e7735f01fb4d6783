"""Login (token kept 0600, checked first), port discovery, and the simulated device command."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import check_expected, run_cli
from fleet_server import FleetServer

from cityedge_core import frame
from cityedge_fleet.models import Role
from cityedge_provision import cli as prov_cli
from cityedge_provision.errors import ProvisionError
from cityedge_provision.transport import PortInfo, SerialTransport

ROOT = Path(__file__).resolve().parents[2]


def test_login_checks_the_token_and_keeps_it_private(fleet: FleetServer,
                                                     tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    token = fleet.token(Role.technician, "alice")
    res = run_cli(["provision", "login", "--url", fleet.url, "--token-stdin"], home,
                  input="not-a-token\n")
    assert res.exit_code == 1
    assert "the fleet refused your login token" in res.output
    assert not (home / "login.json").exists()
    res = run_cli(["provision", "login", "--url", fleet.url, "--token-stdin"], home,
                  input=token + "\n")
    assert res.exit_code == 0, res.output
    assert token not in res.output
    assert (home / "login.json").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    res = run_cli(["provision", "logout"], home)
    assert res.exit_code == 0 and not (home / "login.json").exists()


def test_port_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    esp = PortInfo("/dev/ttyUSB0", 0x10C4, 0xEA60, "CP2102 USB to UART")
    other = PortInfo("/dev/ttyS0", None, None, "n/a")
    monkeypatch.setattr(prov_cli, "list_ports", lambda: [esp, other])
    assert prov_cli.choose_port(None, yes=True) == "/dev/ttyUSB0"  # the one known bridge
    assert "10c4:ea60, Silicon Labs CP210x" in esp.label()
    monkeypatch.setattr(prov_cli, "list_ports", lambda: [other])
    with pytest.raises(ProvisionError) as e:
        prov_cli.choose_port(None, yes=True)
    assert "choose one with --port" in e.value.hint
    monkeypatch.setattr(prov_cli, "list_ports", lambda: [])
    with pytest.raises(ProvisionError) as e:
        prov_cli.choose_port(None, yes=True)
    assert "no serial port found" in str(e.value)
    assert prov_cli.choose_port("/dev/ttyACM3", yes=True) == "/dev/ttyACM3"


def test_unknown_port_message(tmp_path: Path) -> None:
    res = run_cli(["provision", "--port", "/dev/cityedge-none", "--yes", "--offline"],
                  tmp_path)
    assert res.exit_code == 1
    check_expected("no_such_port", res.output)


def test_simulate_serves_a_device_until_interrupted(tmp_path: Path, micropython: str) -> None:
    # -X faulthandler: a CLI that does not exit is made to print every thread's stack
    # (SIGABRT) into the failure (one CI run, 2026-12-05, waited out the 20 s; 0.4 s is usual)
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "cityedge.cli", "provision", "simulate",
         "--root",
         str(tmp_path / "flash"), "--serial", "SN-00901", "--device",
         "urn:dev:mac:0024befffe800901"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Simulated urn:dev:mac:0024befffe800901"), line
        port = line.split(" on ")[1].split(";")[0]
        with SerialTransport(port) as t:
            assert t.request(frame.T_HELLO)[frame.F_SERIAL] == "SN-00901"
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _out, err = proc.communicate(timeout=10)
            pytest.fail("the CLI did not exit 20 s after SIGINT; its stacks:\n%s" % err[-6000:])
        assert rc == 0, proc.communicate(timeout=10)[1][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
