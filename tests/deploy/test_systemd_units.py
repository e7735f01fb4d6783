"""The project's systemd units: each service rates an exposure of 2.0 or less in
`systemd-analyze security --offline` (systemd's own scoring of its sandboxing options),
speaks ``Type=notify`` with a watchdog, runs as an unprivileged user with no
capabilities, and runs a command the project's CLI has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = [REPO / "gateway" / "cityedge-gateway.service",
            REPO / "deploy" / "systemd" / "cityedge-fleet.service",
            REPO / "deploy" / "systemd" / "cityedge-fleet-ingest.service"]
EXPOSURE_MAX = 2.0


def _service_options(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:  # a real component: missing is a failure, never a skip
        pytest.fail("systemd-analyze is missing (Debian's systemd package has it)")
    return tool


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_each_service_rates_an_exposure_of_two_or_less(analyze: str, unit: Path,
                                                       tmp_path: Path) -> None:
    r = subprocess.run([analyze, "security", "--offline=yes", str(unit)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= EXPOSURE_MAX, r.stdout


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_each_service_notifies_is_watched_and_holds_no_privilege(unit: Path) -> None:
    opts = _service_options(unit)
    assert opts["Type"] == ["notify"] and opts["NotifyAccess"] == ["main"]
    assert int(opts["WatchdogSec"][0]) > 0
    assert opts["User"][0] not in ("root", "0") and opts["CapabilityBoundingSet"] == [""]
    assert opts["NoNewPrivileges"] == ["true"] and opts["ProtectSystem"] == ["strict"]
    # the command key is read from its file, never a credential copy: a --switch replaces
    # the file and the running service follows it (command_key.KeyFile)
    assert not any("command.key" in c for c in opts.get("LoadCredential", []))
    for cred in opts.get("LoadCredential", []):
        name = cred.split(":", 1)[0]
        assert any("%%d/%s" % name in e for e in opts.get("Environment", [])), cred


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_each_service_runs_a_command_the_cli_has(unit: Path) -> None:
    """The ExecStart's `cityedge ...` words (options included) are a command of the
    project's CLI: its --help lists every option the unit passes."""
    words = _service_options(unit)["ExecStart"][0].split()
    assert words[0].endswith("/bin/cityedge")
    path = [w for w in words[1:] if not w.startswith("-")][:2]
    options = [w for w in words[1:] if w.startswith("--")]
    r = subprocess.run([sys.executable, "-m", "cityedge.cli", *path, "--help"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stderr
    for opt in options:
        assert opt in r.stdout, (unit.name, opt)


def test_the_broker_reload_path_watches_what_the_fleet_writes() -> None:
    from cityedge_fleet.ca import CRL_FILE

    path_unit = (REPO / "deploy" / "systemd" / "cityedge-broker-reload.path").read_text()
    state = _service_options(REPO / "deploy" / "systemd" / "cityedge-fleet.service")
    assert state["StateDirectory"] == ["cityedge-fleet"]
    assert "PathChanged=/var/lib/cityedge-fleet/ca/%s" % CRL_FILE in path_unit
    reload_unit = (REPO / "deploy" / "systemd" / "cityedge-broker-reload.service").read_text()
    assert "systemctl reload mosquitto.service" in reload_unit
