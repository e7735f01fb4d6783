"""docs/OPERATIONS.md: every `cityedge ...` command in its code blocks is one the CLI has,
with options it takes; and each is run for real by a test named here (the guide's steps
on a real broker, fleet and gateway)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from support import cli

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "OPERATIONS.md"

# the test that runs each command of the guide for real
RUN_BY = {
    ("ca", "init"): "tests/fleet/test_fleet_broker_service.py",
    ("ca", "issue-service"): "tests/fleet/test_fleet_broker_service.py",
    ("broker", "config"): "tests/fleet/test_fleet_broker_service.py",
    ("fleet", "init-db"): "tests/deploy/test_packaging.py",
    ("fleet", "create-token"): "tests/fleet/test_fleet_serve.py",
    ("gateway", "run"): "tests/gateway/test_gateway_service_unit.py",
    ("fleet", "ingest"): "tests/support/faults.py",
    ("fleet", "retention"): "tests/fleet/test_fleet_reading_partitions.py",
}


def _commands() -> list[list[str]]:
    text = GUIDE.read_text()
    out = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("cityedge "):
                out.append(line.split()[1:])
    return out


def test_the_guide_has_commands() -> None:
    assert len(_commands()) >= 8


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w[:2]))
def test_each_command_of_the_guide_exists_with_its_options_and_is_run_by_a_test(
        words: list[str]) -> None:
    path = words[:2]
    options = [w for w in words if w.startswith("--")]
    r = cli.run([*path, "--help"], dict(os.environ, COLUMNS="200"))  # in process
    assert r.returncode == 0, r.stderr
    for opt in options:
        assert opt in r.stdout, (path, opt)
    runner = REPO / RUN_BY[tuple(path)]  # type: ignore[index]
    body = runner.read_text()
    assert all(w in body for w in path), (path, runner)
