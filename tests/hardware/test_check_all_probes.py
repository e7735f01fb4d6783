"""``cityedge hw check`` with the network, firmware-image and Raspberry Pi host probes wired
in: a gateway host built from the project's own unit and configuration, scanned together
with the project's hardened broker (the real Mosquitto), passes every requirement those
probes decide; the project's own firmware build, given without its signed release, passes
the secret and REPL checks and leaves the signature and sequence undecided, naming what to
supply. Both reports validate against the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from cityedge.build_firmware import build
from cityedge.cli import app
from cityedge_hardware import host_rules, image_rules, net_rules
from cityedge_hardware.report_json import schema

from support.hw_host import hardened_root
from support.mosquitto import Mosquitto

HOST_REQS = {host_rules.REQ_SSH, host_rules.REQ_PRIV, host_rules.REQ_ACCOUNTS,
             host_rules.REQ_UPDATES, host_rules.REQ_CONFINE, host_rules.REQ_KEYS}
NET_REQS = {net_rules.REQ_PORTS, net_rules.REQ_CLEAR_TEXT, net_rules.REQ_BANNER,
            net_rules.REQ_AUTH, net_rules.REQ_CERT_AUTH}  # CE-NET-01 needs a TLS server's chain


def _check(args: list[str], out: Path) -> tuple[int, dict[str, Any], str]:
    res = CliRunner().invoke(app, ["hw", "check", "--profile", "city-critical", *args,
                                   "--out", str(out)], catch_exceptions=False)
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)
    return res.exit_code, doc, res.output


def _checks(doc: dict[str, Any], req: str) -> list[dict[str, Any]]:
    [row] = [r for r in doc["requirements"] if r["id"] == req]
    return list(row["checks"])


def test_a_gateway_host_and_its_broker_pass_every_probe_requirement(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    root = hardened_root(tmp_path / "root")
    port = str(mosquitto.port)
    code, doc, output = _check(
        ["--platform", "rpi-gateway", "--gateway-root", str(root), "--host", "127.0.0.1",
         "--ports", port, "--udp-ports", "", "--declared", port, "--mqtt-ports", port],
        tmp_path / "report")
    assert code == 1, output  # not met: no vendor declaration, so evidence is missing
    assert "network" in output and "Raspberry Pi host" in output  # progress per probe
    selected = {r["id"] for r in doc["requirements"]}
    for req in sorted((HOST_REQS | NET_REQS) & selected):
        checks = _checks(doc, req)
        assert checks, req
        assert {c["outcome"] for c in checks} == {"pass"}, (req, checks)
    tls = _checks(doc, net_rules.REQ_TLS)
    assert {c["check"] for c in tls} >= {"tls-versions", "tls-ciphers"}, tls
    assert all(c["outcome"] == "pass" for c in tls if c["check"] != "tls-certificate"), tls


def test_a_weakened_gateway_host_fails_in_the_report(tmp_path: Path) -> None:
    root = hardened_root(tmp_path / "root")
    (root / "etc/ssh/sshd_config.d/50-cityedge.conf").write_text(
        "PasswordAuthentication yes\nPermitRootLogin no\n")
    code, doc, output = _check(["--platform", "rpi-gateway", "--gateway-root", str(root)],
                               tmp_path / "report")
    assert code == 1, output
    [row] = [r for r in doc["requirements"] if r["id"] == host_rules.REQ_SSH]
    assert row["outcome"] == "fail", row
    assert any(c["check"] == "ssh-password" and c["outcome"] == "fail" for c in row["checks"])


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fw") / "build" / "firmware"
    build(out)
    return out.parent


def test_the_projects_firmware_without_its_release_is_checked_and_says_what_is_missing(
        firmware: Path, tmp_path: Path) -> None:
    code, doc, output = _check(["--platform", "esp32", "--firmware", str(firmware)],
                               tmp_path / "report")
    assert code == 1, output
    assert "firmware image" in output
    by_check = {c["check"]: c for row in doc["requirements"] for c in row["checks"]}
    assert by_check[image_rules.CHECK_REPL]["outcome"] == "pass", by_check
    assert by_check[image_rules.CHECK_SIGNED]["outcome"] == "could not decide"
    assert "--release" in by_check[image_rules.CHECK_SIGNED]["fix"]
    secrets = [c for c in by_check.values() if c["requirement"] == "CE-AUTH-06"]
    assert secrets and all(c["outcome"] == "pass" for c in secrets), secrets
    assert any(i["name"] == "firmware" for i in doc["inputs"])
