"""``cityedge hw``: the catalogue listing and the eFuse check as a vendor runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

from support.efuse_virt import Captures

HERE = Path(__file__).parent
CAPTURES = resources.files("cityedge_hardware").joinpath("captures")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", "hw", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_catalogue_lists_every_requirement_or_a_profiles_selection() -> None:
    every = run("catalogue")
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines()[0] == "cityedge device guidelines: 84 requirements"
    crit = json.loads(run("catalogue", "--profile", "city-critical", "--json").stdout)
    assert crit["profile"] == "city-critical"
    by_id = {r["id"]: r for r in crit["requirements"]}
    assert by_id["CE-UPD-04"]["severity"] == "critical"  # raised from high
    assert by_id["CE-BOOT-01"]["sources"]["en303645"] == ["5.7-1"]


def test_an_unknown_profile_is_one_line_and_a_hint() -> None:
    done = run("catalogue", "--profile", "no-such-profile")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "cityedge: no profile 'no-such-profile'",
        "  what to do: bundled profiles: city-baseline, city-critical, vendor-draft-example; "
        "or pass a path to a .yaml file"]


def test_efuse_on_a_capture_prints_verdicts_evidence_and_fixes() -> None:
    done = run("efuse", "--efuse-json", str(CAPTURES.joinpath("esp32s3_hardened.json")))
    assert done.stdout == (HERE / "expected" / "efuse_esp32s3_hardened.txt").read_text()
    assert done.returncode == 1
    assert done.stderr.startswith("cityedge: 4 of 7 eFuse requirements are not met")


def test_efuse_passes_with_exit_zero_on_a_hardened_virtual_chip(captures: Captures) -> None:
    done = run("efuse", "--efuse-json", str(captures.hardened["esp32c3"]), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["chip"] == "esp32c3"
    assert [v["outcome"] for v in doc["verdicts"]] == ["pass"] * 7


def test_efuse_needs_exactly_one_source(tmp_path: Path) -> None:
    both = run("efuse", "--port", "/dev/null", "--efuse-json", str(tmp_path / "x.json"))
    assert both.returncode == 1
    assert "exactly one of --port and --efuse-json" in both.stderr
    missing = run("efuse", "--efuse-json", str(tmp_path / "x.json"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("cityedge: cannot read")
    assert "Traceback" not in missing.stderr
