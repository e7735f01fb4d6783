"""The technician's laptop and a fleet behind HTTPS signed by the city's private CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import run_cli
from fleet_server import FleetServer

from cityedge_fleet.models import Role
from cityedge_provision.errors import FleetRefused
from cityedge_provision.fleet_client import FleetClient, Workspace, check_fleet_url

from support.mosquitto import Mosquitto, TestPKI


@pytest.fixture
def https_fleet(tmp_path: Path, pki: TestPKI, mosquitto: Mosquitto) -> Iterator[FleetServer]:
    server = FleetServer(tmp_path / "fleet", pki, mosquitto.port, tls=True).start()
    yield server
    server.stop()


def test_login_needs_the_private_ca_and_keeps_using_it(https_fleet: FleetServer, pki: TestPKI,
                                                       tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    token = https_fleet.token(Role.technician, "alice")
    assert https_fleet.url.startswith("https://")
    res = run_cli(["provision", "login", "--url", https_fleet.url, "--token-stdin"], home,
                  input=token + "\n")
    assert res.exit_code == 1
    assert "HTTPS certificate" in res.output and "not trusted" in res.output
    assert "--ca-file" in res.output
    assert not (home / "login.json").exists()

    res = run_cli(["provision", "login", "--url", https_fleet.url, "--token-stdin",
                   "--ca-file", str(pki.ca_pem)], home, input=token + "\n")
    assert res.exit_code == 0, res.output
    ws = Workspace(home)
    assert ws.login_ca_file() == pki.ca_pem.resolve()
    client = FleetClient.from_workspace(ws)  # later commands trust the same CA
    try:
        client.check_login()
        assert client.get_device("urn:dev:mac:0024befffe80ffff") is None
    finally:
        client.close()


def test_a_bundle_without_the_fleets_ca_is_not_enough(https_fleet: FleetServer,
                                                      tmp_path: Path) -> None:
    other = TestPKI(tmp_path / "other-pki", ca_name="someone else's CA")
    token = https_fleet.token(Role.technician, "bob")
    res = run_cli(["provision", "login", "--url", https_fleet.url, "--token-stdin",
                   "--ca-file", str(other.ca_pem)], tmp_path / "laptop", input=token + "\n")
    assert res.exit_code == 1 and "not trusted" in res.output


def test_a_ca_file_that_is_not_pem_is_refused(https_fleet: FleetServer, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    res = run_cli(["provision", "login", "--url", https_fleet.url, "--token-stdin",
                   "--ca-file", str(junk)], tmp_path / "laptop", input="t\n")
    assert res.exit_code == 1 and "cannot use" in res.output and "CA bundle" in res.output


@pytest.mark.parametrize("url", ["http://fleet.city.example", "http://10.0.0.5:8000",
                                 "ftp://fleet.city.example", "fleet.city.example", "https://"])
def test_the_token_never_goes_out_in_clear(url: str, tmp_path: Path) -> None:
    with pytest.raises(FleetRefused, match="use https://"):
        check_fleet_url(url)
    res = run_cli(["provision", "login", "--url", url, "--token-stdin"], tmp_path / "laptop",
                  input="secret-token\n")
    assert res.exit_code == 1 and "use https://" in res.output
    assert "secret-token" not in res.output


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/",
                                 "https://fleet.city.example"])
def test_https_anywhere_and_http_on_this_machine_are_fine(url: str) -> None:
    assert check_fleet_url(url) == url.rstrip("/")
