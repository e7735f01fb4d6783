"""Which fleet keys a device is told to trust: the fleet's own trust store from its
enrollment answer, or, offline, the one fetched with the tokens; ``--fleet-key`` files
override both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cityedge_provision.errors import FleetRefused
from cityedge_provision.fleet_client import Workspace
from cityedge_provision.session import Options, ProvisionSession

FLEETS = "04" + "11" * 64
OVERRIDE = bytes.fromhex("04" + "22" * 64)


def session(tmp_path: Path, **opts: Any) -> ProvisionSession:
    return ProvisionSession(None, Workspace(tmp_path), None, Options(**opts))  # type: ignore[arg-type]


def test_the_fleets_trust_store_unless_files_override_it(tmp_path: Path) -> None:
    answer = {"fleet_keys": [FLEETS]}
    assert session(tmp_path).fleet_keys(answer) == [bytes.fromhex(FLEETS)]
    assert session(tmp_path, fleet_keys=[OVERRIDE]).fleet_keys(answer) == [OVERRIDE]
    assert session(tmp_path).fleet_keys({}) == []  # an answer from an older fleet
    with pytest.raises(FleetRefused, match="not a hex SEC1 point"):
        session(tmp_path).fleet_keys({"fleet_keys": ["zz"]})


def test_offline_the_keys_fetched_with_the_tokens_are_kept(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.fleet_keys() == []
    ws.save_fleet_keys([FLEETS])
    assert ws.fleet_keys() == [bytes.fromhex(FLEETS)]
    assert (tmp_path / "fleet_keys.json").stat().st_mode & 0o077 == 0
