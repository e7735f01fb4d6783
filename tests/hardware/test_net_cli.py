"""``cityedge hw net`` as a vendor runs it: a scan of the project's hardened broker that
passes (exit 0) and is saved, the saved scan replayed with another declared list (exit 1),
and the user errors (a public address, a bad port list, a bad saved scan) as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from cityedge.cli import app

from support.mosquitto import Mosquitto


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["hw", "net", *args])


def test_a_hardened_broker_passes_and_its_saved_scan_replays(mosquitto: Mosquitto,
                                                             tmp_path: Path) -> None:
    port = str(mosquitto.port)
    saved = tmp_path / "scan.json"
    done = run("--host", "127.0.0.1", "--ports", port, "--udp-ports", "", "--mqtt-ports", port,
               "--declared", port, "--save-scan", str(saved), "--json")
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert doc["host"] == "127.0.0.1"
    assert [(v["requirement"], v["outcome"]) for v in doc["verdicts"]] == [
        ("CE-NET-05", "pass"), ("CE-NET-06", "pass"), ("CE-NET-07", "pass"),
        ("CE-NET-01", "pass"), ("CE-NET-01", "pass"), ("CE-NET-01", "pass"),
        ("CE-NET-03", "pass"), ("CE-AUTH-03", "pass")]
    assert "network: %s/tcp is open" % port in done.stderr  # progress, on stderr
    assert json.loads(saved.read_text())["schema"] == "cityedge-net-scan/1"

    replay = run("--scan-json", str(saved))  # nothing declared this time
    assert replay.exit_code == 1
    assert ("FAIL             CE-NET-05  open-ports       1 open port(s) not on the declared "
            "list: %s/tcp" % port) in replay.stdout
    assert replay.stderr.splitlines()[0] == (
        "cityedge: 1 of 8 network checks are not met or could not be decided")


def test_a_public_address_is_refused_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "cityedge.cli", "hw", "net", "--host",
                           "8.8.8.8", "--ports", "53"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        "cityedge: 8.8.8.8 (8.8.8.8) is not a loopback, private or link-local address: the "
        "probe does not scan it without --allow-public")
    assert "Traceback" not in done.stderr


def test_user_errors_are_one_line_with_what_to_do(tmp_path: Path) -> None:
    bad_ports = run("--host", "127.0.0.1", "--ports", "22,99999")
    assert bad_ports.exit_code == 1
    assert bad_ports.stderr.startswith("cityedge: --ports: '99999' is outside 1..65535")
    neither = run()
    assert neither.exit_code == 1
    assert neither.stderr.startswith("cityedge: give --host")
    garbage = tmp_path / "scan.json"
    garbage.write_text('{"schema": "cityedge-net-scan/1", "host": 5}')
    bad_scan = run("--scan-json", str(garbage))
    assert bad_scan.exit_code == 1
    assert bad_scan.stderr.startswith("cityedge: %s: missing keys" % garbage)
    for done in (bad_ports, neither, bad_scan):
        assert "Traceback" not in done.stderr and "what to do:" in done.stderr
