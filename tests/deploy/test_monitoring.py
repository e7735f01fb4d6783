"""The Prometheus alert rules and Grafana dashboards in ``deploy/``: promtool (Debian's
`prometheus` package) checks the rules and runs their unit tests (each alert fires on the
series that should raise it, not before); the dashboards are well-formed Grafana JSON
whose every query names a metric the project serves (the names are checked against real
scrapes in tests/fleet/test_fleet_metrics.py and tests/gateway/test_service.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from support.monitoring import DEPLOY, names_used


@pytest.fixture(scope="module")
def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:  # a real component: missing is a failure, never a skip
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus")
    return tool


def test_the_alert_rules_are_valid_and_fire_as_their_tests_say(promtool: str) -> None:
    rules = DEPLOY / "prometheus"
    check = subprocess.run([promtool, "check", "rules", "cityedge-alerts.yml"], cwd=rules,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", "cityedge-alerts.test.yml"], cwd=rules,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "SUCCESS" in run.stdout + run.stderr, run.stdout


def test_a_broken_rule_is_caught(promtool: str, tmp_path: pytest.TempPathFactory) -> None:
    """The check above can fail: a rule whose expression does not parse is refused."""
    bad = (DEPLOY / "prometheus" / "cityedge-alerts.yml").read_text().replace(
        "cityedge_fleet_crl_present == 0", "cityedge_fleet_crl_present ==", 1)
    path = tmp_path / "bad.yml"  # type: ignore[operator]
    path.write_text(bad)
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0


def test_the_dashboards_are_grafana_json_over_served_names() -> None:
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"] and d["panels"], path.name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for p in d["panels"]:
            assert p["targets"] and all(t["expr"] for t in p["targets"]), (path.name, p)
            assert p["datasource"]["type"] == "prometheus"
    assert names_used("cityedge_fleet_") and names_used("cityedge_gateway_")
