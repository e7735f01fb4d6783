"""The device's private key never leaves the device: after a full provisioning, search the
fleet's database, its CA directory, every log and every file on the technician's laptop
for the key in every form it could take (raw, hex, base64, DER, PEM) and find nothing.

A positive control searches the device's own flash with the same code and must find it."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from cli_support import run_cli
from device_pty import DeviceFactory
from fleet_server import FleetServer

from cityedge_provision.fleet_client import Workspace


def needles(key_der: bytes) -> list[bytes]:
    i = key_der.find(b"\x02\x01\x01\x04\x20")
    assert i >= 0, "not a SEC1 key"
    d = key_der[i + 5:i + 37]
    b64_der = base64.b64encode(key_der)
    return [d, d.hex().encode(), d.hex().upper().encode(), base64.b64encode(d)[:40],
            base64.urlsafe_b64encode(d)[:40], key_der, b64_der[:48],
            str(int.from_bytes(d, "big")).encode()]


def files_under(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


def holders(paths: list[Path], extra: dict[str, bytes], keys: list[bytes]) -> list[str]:
    found = []
    for p in paths:
        data = p.read_bytes()
        found += ["%s has %r" % (p, k[:8]) for k in keys if k in data]
    for name, data in extra.items():
        found += ["%s has %r" % (name, k[:8]) for k in keys if k in data]
    return found


def test_no_private_key_in_fleet_db_logs_or_laptop(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    dev = make_device("SN-00801", "urn:dev:mac:0024befffe800801")
    res = run_cli(["provision", "--port", dev.port, "--yes", "--label",
                   str(home / "label.png")], home)
    assert res.exit_code == 0, res.output
    dev.stop()
    keys = needles((dev.root / "key.der").read_bytes())
    # positive control: the same search finds the key on the device's flash
    assert holders(files_under(dev.root), {}, keys)
    logs = {"cli output": res.output.encode(), "captured logs": caplog.text.encode(),
            "device console": dev.read_log().encode()}
    searched = files_under(fleet.dir, home)
    assert any(p.name.startswith("fleet.sqlite3") for p in searched)
    assert any(p.name == "provisioned.jsonl" for p in searched)
    assert holders(searched, logs, keys) == []
