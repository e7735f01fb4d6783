"""``cityedge hw check``: which steps run, requirement outcomes, the JSON report against its
schema, and the exit code against the profile."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_hardware.catalogue import Selected, load_catalogue, load_profile
from cityedge_hardware.check import STEPS, CheckInputs, Step, run_check
from cityedge_hardware.report import OUTCOMES, decide, evaluate
from cityedge_hardware.report_json import schema
from cityedge_hardware.verdict import Outcome, Verdict
from cityedge_host.errors import UserError

from support.efuse_virt import Captures

PKG = resources.files("cityedge_hardware")
CAPTURES = Path(str(PKG.joinpath("captures")))
EXAMPLES = Path(str(PKG.joinpath("examples")))
EFUSE_IDS = ["CE-BOOT-01", "CE-BOOT-02", "CE-DATA-01", "CE-DATA-02", "CE-DBG-01", "CE-DBG-02",
             "CE-BOOT-03"]


def hw_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", "hw", "check", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def validated(out: Path) -> dict:  # type: ignore[type-arg]
    doc = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)
    return doc  # type: ignore[no-any-return]


def efuse_profile(tmp_path: Path) -> Path:
    path = tmp_path / "efuse-only.yaml"
    path.write_text("profile: efuse-only\ntitle: The eFuse requirements and nothing else\n"
                    "select:\n  ids: [%s]\n" % ", ".join(EFUSE_IDS))
    return path


def test_a_hardened_chip_meets_an_efuse_profile_exit_0(tmp_path: Path,
                                                       captures: Captures) -> None:
    capture = captures.hardened["esp32s3"]
    done = hw_check("--profile", str(efuse_profile(tmp_path)), "--efuse-json", str(capture),
                    "--vendor", "Example", "--model", "S3 node", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["[1/1] eFuse capture ...",
                                        "[1/1] eFuse capture ... 7 verdicts"]
    doc = validated(tmp_path / "r")
    assert doc["summary"] == {"met": True, "counts": {
        "pass": 7, "fail": 0, "needs evidence": 0, "not applicable": 0, "could not decide": 0}}
    assert doc["inputs"] == [{"name": "efuse-json", "source": str(capture),
                              "sha256": hashlib.sha256(capture.read_bytes()).hexdigest()}]
    assert doc["device"] == {"vendor": "Example", "model": "S3 node", "platform": "esp32",
                             "chip": "esp32s3", "firmware": None}
    assert doc["profile"]["sha256"] == hashlib.sha256(
        (tmp_path / "efuse-only.yaml").read_bytes()).hexdigest()
    assert doc["catalogue"]["sha256"] == hashlib.sha256(
        PKG.joinpath("catalogue.yaml").read_bytes()).hexdigest()
    assert done.stdout.splitlines()[0] == (
        "S3 node efuse-only: MET (7 pass, 0 fail, 0 needs evidence, 0 not applicable, "
        "0 could not decide)")


def test_the_bundled_captures_do_not_meet_the_baseline_exit_1(tmp_path: Path) -> None:
    done = hw_check("--efuse-json", str(CAPTURES / "esp32_hardened.json"), "--evidence",
                    str(EXAMPLES / "vendor.yaml"), "--out", str(tmp_path))
    assert done.returncode == 1, done.stderr
    doc = validated(tmp_path)
    assert doc["summary"]["met"] is False
    counts = doc["summary"]["counts"]
    assert sum(counts.values()) == len(load_profile("city-baseline").selected)
    by_id = {r["id"]: r for r in doc["requirements"]}
    assert by_id["CE-SYS-01"]["outcome"] == "not applicable"  # a Pi gateway requirement
    assert by_id["CE-GOV-04"]["outcome"] == "pass"  # the example SBOM
    assert by_id["CE-AUTH-06"]["outcome"] == "could not decide"  # no --firmware given
    assert by_id["CE-GOV-11"]["outcome"] == "needs evidence"
    fails = [r for r in doc["requirements"] if r["outcome"] == "fail"]
    assert fails and all(r["fix"] for r in fails)
    assert (tmp_path / "report.html").read_text().count('<tr id="CE-') == len(by_id)


@pytest.mark.parametrize(("args", "message"), [
    (["--efuse-json", "{caps}/esp32.json", "--platform", "rp2040"],
     "cityedge: eFuse and security-info inputs are ESP32 inputs, not rp2040"),
    (["--firmware", "{caps}"], "cityedge: name the platform: --platform esp32, rp2040 or "
     "rpi-gateway (or give --evidence, whose declaration names it)"),
    (["--efuse-json", "{caps}/esp32.json", "--profile", "no-such"],
     "cityedge: no profile 'no-such'"),
    (["--evidence", "{caps}/esp32.json"], "cityedge: {caps}/esp32.json is not a vendor "
     "declaration:"),
])
def test_a_usage_or_input_error_exits_2_with_one_message(tmp_path: Path, args: list[str],
                                                          message: str) -> None:
    done = hw_check(*(a.format(caps=CAPTURES) for a in args), "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == message.format(caps=CAPTURES)
    assert not (tmp_path / "r").exists()


def test_a_missing_input_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = hw_check("--efuse-json", str(tmp_path / "none.json"), "--out", str(tmp_path))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_step_that_raises_a_project_error_leaves_its_requirements_undecided() -> None:
    def broken(*_: object) -> list[Verdict]:
        raise UserError("the board did not answer", hint="check the cable")

    lines: list[str] = []
    step = Step("flaky probe", "always", lambda _i: True, ("CE-DBG-03", "CE-AUTH-06"), broken)
    result = run_check(CheckInputs(platform="esp32"), (step,), lines.append)
    got = [(v.requirement, v.outcome, v.reason, v.fix) for v in result.verdicts("probe")]
    assert got == [(r, Outcome.UNDECIDED, "the flaky probe step failed: the board did not "
                    "answer", "check the cable") for r in ("CE-DBG-03", "CE-AUTH-06")]
    assert lines == ["[1/1] flaky probe ...",
                     "[1/1] flaky probe ... could not decide: the board did not answer"]


def test_steps_run_only_on_their_inputs() -> None:
    def names(**kw: object) -> list[str]:
        inputs = CheckInputs(**kw)  # type: ignore[arg-type]
        return [s.name for s in STEPS if s.applies(inputs)]

    assert names(platform="esp32", port="/dev/ttyUSB0") == ["eFuses over USB", "serial console"]
    assert names(platform="rp2040", port="/dev/ttyACM0") == ["serial console"]
    assert names(platform="esp32", port="/dev/x", efuse_json=Path("c.json")) == [
        "eFuse capture", "serial console"]
    assert names(platform="rpi-gateway", firmware=Path("b.tar")) == ["secrets in the firmware"]


CAT = load_catalogue()
SEL = {r.id: Selected(r, r.severity) for r in CAT.requirements}


def v(req: str, outcome: Outcome) -> Verdict:
    return Verdict(req, "t", outcome, "why " + outcome.value, fix="fix " + outcome.value)


@pytest.mark.parametrize(("req", "platform", "probe", "evidence", "expected"), [
    ("CE-SYS-01", "esp32", [], [], "not applicable"),
    ("CE-DATA-02", "esp32", [v("CE-DATA-02", Outcome.PASS)], [], "pass"),
    ("CE-DATA-02", "esp32", [v("CE-DATA-02", Outcome.PASS), v("CE-DATA-02", Outcome.FAIL)],
     [], "fail"),
    ("CE-DATA-02", "esp32", [v("CE-DATA-02", Outcome.UNDECIDED)], [], "could not decide"),
    ("CE-DATA-02", "esp32", [], [], "could not decide"),  # probe-only, no probe ran
    ("CE-GOV-04", "esp32", [], [], "needs evidence"),
    ("CE-GOV-04", "esp32", [], [v("CE-GOV-04", Outcome.PASS)], "pass"),
    ("CE-GOV-04", "esp32", [], [v("CE-GOV-04", Outcome.FAIL)], "fail"),
    ("CE-GOV-04", "esp32", [], [v("CE-GOV-04", Outcome.UNDECIDED)], "could not decide"),
    ("CE-BOOT-01", "esp32", [], [], "needs evidence"),  # both: neither ran
    ("CE-BOOT-01", "esp32", [v("CE-BOOT-01", Outcome.PASS)], [], "pass"),
    ("CE-BOOT-01", "esp32", [], [v("CE-BOOT-01", Outcome.PASS)], "pass"),
    ("CE-BOOT-01", "esp32", [v("CE-BOOT-01", Outcome.UNDECIDED)], [v("CE-BOOT-01",
                                                                     Outcome.PASS)],
     "could not decide"),  # a document does not override a probe
    ("CE-BOOT-01", "rp2040", [v("CE-BOOT-01", Outcome.PASS)], [v("CE-BOOT-01", Outcome.FAIL)],
     "fail"),
])
def test_decide_follows_its_rules(req: str, platform: str, probe: list[Verdict],
                                  evidence: list[Verdict], expected: str) -> None:
    got = decide(SEL[req], platform, probe, evidence)
    assert got.outcome == expected
    if expected == "fail":
        assert got.fix == "fix fail"
    if expected == "needs evidence":
        assert got.fix.startswith("declare it in the evidence file: ")


PROFILE = load_profile("city-critical")
IDS = PROFILE.ids()


@given(st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(list(Outcome)),
                          st.booleans()), max_size=40),
       st.sampled_from(["esp32", "rp2040", "rpi-gateway"]))
def test_met_iff_every_selected_requirement_passes_or_does_not_apply(
        checks: list[tuple[str, Outcome, bool]], platform: str) -> None:
    probe = [v(r, o) for r, o, is_probe in checks if is_probe]
    evidence = [v(r, o) for r, o, is_probe in checks if not is_probe]
    result = evaluate(PROFILE, platform, probe, evidence)
    assert [r.id for r in result.results] == IDS
    assert sum(result.counts.values()) == len(IDS)
    assert set(result.counts) == set(OUTCOMES)
    assert result.met == all(r.outcome in ("pass", "not applicable") for r in result.results)
    failed = {r for r, o, _ in checks if o is Outcome.FAIL}
    for r in result.results:
        applies = platform in r.selected.requirement.platforms
        assert (r.outcome == "fail") == (applies and r.id in failed)
