"""The fleet's reading of a hardware report (``hw_report_check``), no database: a whole,
consistent report is accepted with ``met`` recomputed; a forged summary, a left-out
requirement, a duplicate key, another catalogue version or an oversized report is refused,
each naming what is wrong. Hypothesis: for any outcomes, a report with the true summary is
accepted and ``met`` follows the shared rule; any other summary is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_fleet.config import FleetLimits
from cityedge_fleet.hw_report_check import (
    HwReportRefused,
    Outcome,
    check_report,
    outcome_counts,
    profile_met,
)
from cityedge_hardware.catalogue import load_profile

from support.hw_reports import OUTCOMES, encode, make_report

LIMITS = FleetLimits()
BASELINE_IDS = load_profile("city-baseline").ids()


def refused(data: bytes, limits: FleetLimits = LIMITS) -> HwReportRefused:
    with pytest.raises(HwReportRefused) as e:
        check_report(data, limits)
    return e.value


def test_a_whole_passing_report_is_accepted_and_met() -> None:
    got = check_report(encode(make_report("ce-air-1")), LIMITS)
    assert got.met is True
    assert got.counts == {"pass": len(BASELINE_IDS), "fail": 0, "needs evidence": 0,
                          "not applicable": 0, "could not decide": 0}
    assert got.report.device.model == "ce-air-1" and got.report.profile.name == "city-baseline"
    assert got.generated_at.isoformat() == "2026-12-04T10:00:00+00:00"


def test_a_forged_met_is_refused() -> None:
    """The attack: one failing requirement, and a summary that says the profile is met."""
    report = make_report("ce-air-1", outcomes={BASELINE_IDS[0]: "fail"}, met=True,
                         counts={"pass": len(BASELINE_IDS)})
    e = refused(encode(report))
    assert e.code == "summary"
    assert any("summary.met is true but the outcomes make it false" in p for p in e.problems)
    assert any(p.startswith("summary.counts") for p in e.problems)


def test_counts_that_do_not_add_up_are_refused_even_when_met_is_right() -> None:
    report = make_report("ce-air-1", counts={"pass": 1})
    e = refused(encode(report))
    assert e.code == "summary" and len(e.problems) == 1
    assert "are not the counts of the requirements' outcomes" in e.problems[0]


def test_a_report_that_leaves_out_a_failing_requirement_is_refused() -> None:
    report = make_report("ce-air-1")
    report["requirements"] = report["requirements"][1:]
    e = refused(encode(report))
    assert e.code == "requirements"
    assert e.problems == ["the report leaves out 1 requirement(s) profile city-baseline "
                          "selects: %s" % BASELINE_IDS[0]]


def test_a_requirement_listed_twice_is_refused() -> None:
    report = make_report("ce-air-1")
    report["requirements"].append(dict(report["requirements"][0], outcome="fail"))
    e = refused(encode(report))
    assert e.code == "requirements"
    assert e.problems == ["requirements listed more than once: %s" % BASELINE_IDS[0]]


def test_a_duplicate_key_is_refused() -> None:
    """Two parsers could read different values of a duplicated ``met``."""
    text = encode(make_report("ce-air-1", outcomes={BASELINE_IDS[0]: "fail"}))
    forged = text.replace(b'"met": false', b'"met": false, "met": true', 1)
    assert forged != text
    e = refused(forged)
    assert e.code == "form" and e.problems == ["the key 'met' appears twice in one object"]


def test_another_catalogue_version_or_an_unknown_profile_is_refused() -> None:
    report = make_report("ce-air-1")
    report["catalogue"]["version"] = 99
    report["profile"]["name"] = "my-own-profile"
    e = refused(encode(report))
    assert e.code == "profile"
    assert e.problems[0].startswith("profile.name: 'my-own-profile' is not a bundled profile")
    assert e.problems[1].startswith("catalogue.version: the report was made with catalogue "
                                    "version 99; this fleet has version 1")


@pytest.mark.parametrize(("edit", "where"), [
    (lambda r: r.update(schema="cityedge-hw-report/2"), "schema"),
    (lambda r: r["summary"].update(met="true"), "summary.met"),
    (lambda r: r["catalogue"].update(version="1"), "catalogue.version"),
    (lambda r: r.update(generated_at="2026-12-04T10:00:00"), "generated_at"),
    (lambda r: r["device"].update(platform="esp8266"), "device.platform"),
    (lambda r: r["device"].update(model="ce\x1b[2Jair"), "device.model"),
    (lambda r: r["requirements"][0].update(outcome="passed"), "requirements.0.outcome"),
    (lambda r: r["requirements"][0].update(id="../../etc"), "requirements.0.id"),
    (lambda r: r.pop("device"), "device"),
])
def test_a_field_of_the_wrong_form_is_named(edit: object, where: str) -> None:
    report = make_report("ce-air-1")
    edit(report)  # type: ignore[operator]
    e = refused(encode(report))
    assert e.code == "form"
    assert any(p.startswith(where + ":") for p in e.problems), e.problems
    assert not any("\x1b" in p for p in e.problems)  # the value is never quoted


def test_limits_on_size_requirements_and_checks() -> None:
    data = encode(make_report("ce-air-1"))
    assert refused(data, FleetLimits(hw_report_max_bytes=len(data) - 1)).problems == [
        "the report has %d bytes; at most %d" % (len(data), len(data) - 1)]
    few = refused(data, FleetLimits(hw_report_max_requirements=10, hw_report_max_checks=5))
    assert few.problems == ["the report lists %d requirements; at most 10" % len(BASELINE_IDS),
                            "the report has %d checks; at most 5" % len(BASELINE_IDS)]


@pytest.mark.parametrize(("data", "problem"), [
    (b"\xff{}", "the report is not UTF-8 (byte 0)"),
    (b"{", "the report is not JSON: Expecting property name enclosed in double quotes at "
     "line 1 column 2"),
    (b"[]", "the report is a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "the report is nested too deeply"),
])
def test_what_is_not_a_json_object_is_refused(data: bytes, problem: str) -> None:
    assert refused(data).problems == [problem]


def test_fields_the_fleet_does_not_read_are_kept() -> None:
    report = make_report("ce-air-1")
    report["sbom"] = {"format": "CycloneDX"}
    report["requirements"][0]["evidence_file"] = "vendor.yaml"
    got = check_report(encode(report), LIMITS)
    assert got.report.model_extra == {"sbom": {"format": "CycloneDX"}, "inputs": [
        {"name": "efuse-json", "source": "efuse.json", "sha256": report["inputs"][0]["sha256"]}]}
    assert got.report.requirements[0].model_extra == {
        "evidence_file": "vendor.yaml", "text": report["requirements"][0]["text"],
        "severity": report["requirements"][0]["severity"],
        "decided_by": report["requirements"][0]["decided_by"], "fix": ""}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(OUTCOMES), min_size=len(BASELINE_IDS),
                max_size=len(BASELINE_IDS)), st.booleans())
def test_met_follows_the_shared_rule_and_any_other_summary_is_refused(
        outcomes: list[str], flip: bool) -> None:
    chosen = dict(zip(BASELINE_IDS, outcomes, strict=True))
    expect = all(o in ("pass", "not applicable") for o in outcomes)
    assert profile_met(outcomes) is expect
    assert outcome_counts(outcomes) == {o.value: outcomes.count(o.value) for o in Outcome}
    honest = make_report("ce-air-1", outcomes=chosen)
    got = check_report(encode(honest), LIMITS)
    assert got.met is expect and got.counts == honest["summary"]["counts"]
    if flip:
        lie = make_report("ce-air-1", outcomes=chosen, met=not expect)
    else:
        counts = dict(honest["summary"]["counts"])
        counts["pass"] += 1
        lie = make_report("ce-air-1", outcomes=chosen, counts=counts)
    assert refused(encode(lie)).code == "summary"

