"""One error family for the command line (``cityedge_host.errors.UserError``), printed once,
at the top, the same way whichever part raised it; the exit codes the README documents."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cityedge_fleet.broker import BrokerConfigError
from cityedge_gateway.config import ConfigError
from cityedge_host.crypto import KeyFileError
from cityedge_host.errors import UserError
from cityedge_provision.errors import DeviceRefused, FleetRefused, LinkError, ProvisionError
from cityedge_provision.label import LabelError


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env=env if env is not None else dict(os.environ))


@pytest.mark.parametrize("family", [ProvisionError, LinkError, DeviceRefused, FleetRefused,
                                    ConfigError, KeyFileError, BrokerConfigError, LabelError])
def test_every_part_raises_the_one_family(family: type[Exception]) -> None:
    assert issubclass(family, UserError)


def test_a_user_error_is_one_line_and_a_hint_whatever_part_raised_it(tmp_path: Path) -> None:
    cases = [
        # provisioning: a port that does not exist (LinkError, with its hint)
        (("provision", "--port", str(tmp_path / "ttyNONE"), "--yes"), True),
        # gateway: a configuration file that does not exist (ConfigError)
        (("gateway", "run", "--config", str(tmp_path / "missing.toml")), False),
        # fleet: settings that do not name a mode (UserError)
        (("audit", "verify"), False),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")}
    env["CITYEDGE_HOME"] = str(tmp_path / "home")
    for args, hinted in cases:
        r = _run(*args, env=env, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr, r.stderr
        assert sum(1 for ln in lines if ln.startswith("cityedge: ")) == 1, r.stderr
        assert lines[0].startswith("cityedge: "), r.stderr
        assert any(ln.startswith("  what to do: ") for ln in lines) == hinted, r.stderr


def test_a_usage_error_exits_2() -> None:
    r = _run("--no-such-option")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
