"""The vendor declaration and its SBOM: presence and form of each item, mapped to requirements."""

from __future__ import annotations

import datetime as dt
import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cityedge_hardware.errors import EvidenceError
from cityedge_hardware.evidence import check_declaration, load_declaration, parse_declaration
from cityedge_hardware.sbom import check_components, parse_sbom
from cityedge_hardware.verdict import Outcome

EXAMPLES = Path(str(resources.files("cityedge_hardware").joinpath("examples")))
TODAY = dt.date(2026, 12, 4)


def example() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((EXAMPLES / "vendor.yaml").read_text())


def write(tmp_path: Path, doc: dict, sbom: dict | str | None = None) -> Path:  # type: ignore[type-arg]
    for name in ("statement-of-compliance.md",):
        (tmp_path / name).write_bytes((EXAMPLES / name).read_bytes())
    if sbom is None:
        (tmp_path / "sbom.cdx.json").write_bytes((EXAMPLES / "sbom.cdx.json").read_bytes())
    else:
        text = sbom if isinstance(sbom, str) else json.dumps(sbom)
        (tmp_path / doc["sbom"]["path"]).write_text(text)
    path = tmp_path / "vendor.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def verdicts(path: Path) -> dict[str, tuple[Outcome, str]]:
    return {v.requirement: (v.outcome, v.reason)
            for v in check_declaration(load_declaration(path), today=TODAY)}


def test_the_bundled_example_passes_every_item_it_declares() -> None:
    loaded = load_declaration(EXAMPLES / "vendor.yaml")
    got = {v.requirement: v.outcome for v in check_declaration(loaded, today=TODAY)}
    assert got == {r: Outcome.PASS for r in ("CE-GOV-01", "CE-GOV-02", "CE-GOV-03", "CE-GOV-04",
                                               "CE-GOV-05", "CE-GOV-06", "CE-UPD-08")}
    assert [f.name for f in loaded.inputs] == ["evidence", "sbom", "document CE-GOV-01"]


def test_each_item_is_checked_for_its_form(tmp_path: Path) -> None:
    doc = example()
    doc["vulnerability_disclosure"]["url"] = "http://sensors.example/security.txt"
    doc["support"]["end"] = dt.date(2026, 12, 4)  # today: the period has ended
    doc["update_policy"]["security_only_releases"] = False
    doc["documents"]["CE-GOV-06"] = {"title": "label", "url": "ftp://x.example/label.pdf"}
    doc["documents"]["CE-GOV-01"]["path"] = "missing.md"
    got = verdicts(write(tmp_path, doc))
    assert got["CE-GOV-02"] == (Outcome.FAIL, "'http://sensors.example/security.txt' is not an "
                                              "https URL")
    assert got["CE-GOV-05"][0] is Outcome.FAIL
    assert "ended on 2026-12-04" in got["CE-GOV-05"][1]
    assert got["CE-UPD-08"] == (Outcome.FAIL, "security fixes ship only with feature releases")
    assert got["CE-GOV-06"][0] is Outcome.FAIL
    assert got["CE-GOV-01"][0] is Outcome.FAIL and "missing.md" in got["CE-GOV-01"][1]


def test_an_item_left_out_gives_no_verdict(tmp_path: Path) -> None:
    doc = example()
    for key in ("vulnerability_disclosure", "support", "update_policy", "sbom", "documents"):
        del doc[key]
    assert verdicts(write(tmp_path, doc)) == {}


def test_a_bad_structure_lists_every_problem_at_once(tmp_path: Path) -> None:
    doc = example()
    del doc["vendor"]
    doc["colour"] = "blue"
    doc["support"]["notice_months"] = "twelve"
    doc["documents"]["CE-DATA-02"] = {"title": "flash key memo", "url": "https://x.example/"}
    doc["documents"]["CE-ZZZ-01"] = {"title": "no such", "url": "https://x.example/"}
    with pytest.raises(EvidenceError) as e:
        parse_declaration(yaml.safe_dump(doc).encode(), "vendor.yaml")
    text = str(e.value)
    assert "vendor: Field required" in text
    assert "colour: Extra inputs are not permitted" in text
    assert "support.notice_months" in text
    doc = example()
    doc["documents"]["CE-DATA-02"] = {"title": "flash key memo", "url": "https://x.example/"}
    doc["documents"]["CE-GOV-11"] = {"title": "both", "url": "https://x.example/",
                                     "path": "plan.pdf"}
    with pytest.raises(EvidenceError) as e:
        parse_declaration(yaml.safe_dump(doc).encode(), "vendor.yaml")
    assert str(e.value).splitlines()[1:] == [
        "  documents.CE-DATA-02: decided by a probe only; a document cannot decide it",
        "  documents.CE-GOV-11: give exactly one of path and url"]


def test_a_declaration_larger_than_its_limit_is_refused_before_parsing() -> None:
    with pytest.raises(EvidenceError, match="more than 65536"):
        parse_declaration(b"vendor: " + b"x" * 70000)


def test_an_alias_bomb_in_a_declaration_is_refused_field_by_field() -> None:
    lines = ["  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += ["  a%d: &a%d [%s]" % (i, i, ", ".join(["*a%d" % (i - 1)] * 10)) for i in range(1, 9)]
    text = "\n".join(["schema: cityedge-vendor-declaration/1", "model: m", "platform: esp32",
                      "firmware: 0.1.0", "x:", *lines, "vendor: *a8"])  # 10^9 leaves
    with pytest.raises(EvidenceError) as e:
        parse_declaration(text.encode())
    assert str(e.value).splitlines()[1:] == ["  vendor: Input should be a valid string",
                                              "  x: Extra inputs are not permitted"]


def test_an_sbom_past_its_limits_is_refused_with_why() -> None:
    with pytest.raises(EvidenceError, match="more than 8388608"):
        parse_sbom(b"{" + b" " * (8 * 1024 * 1024))
    with pytest.raises(EvidenceError, match="not JSON"):
        parse_sbom(b"{\"bomFormat\": " + b"[" * 100000 + b"]" * 100000 + b"}")


VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=3), max_leaves=8)


@given(st.data())
def test_any_change_to_a_declaration_is_read_or_one_evidence_error(data: st.DataObject
                                                                    ) -> None:
    doc = example()
    section = data.draw(st.sampled_from(sorted(doc)))
    if isinstance(doc[section], dict) and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(doc[section])))
        doc[section][key] = data.draw(VALUES)
    else:
        doc[section] = data.draw(VALUES)
    try:
        decl = parse_declaration(yaml.safe_dump(doc).encode())
    except EvidenceError as e:
        assert str(e).startswith("declaration")  # names the file, then the fields
        return
    assert decl.vendor and decl.model  # what it read is a declaration


CDX = json.loads((EXAMPLES / "sbom.cdx.json").read_text())


def test_a_cyclonedx_sbom_without_mbedtls_fails_naming_it(tmp_path: Path) -> None:
    sbom = json.loads(json.dumps(CDX))
    sbom["components"] = [c for c in sbom["components"] if c["name"] != "mbedtls"]
    outcome, reason = verdicts(write(tmp_path, example(), sbom))["CE-GOV-04"]
    assert (outcome, reason) == (Outcome.FAIL, "the SBOM does not list mbedtls")


def test_an_sbom_of_another_release_fails(tmp_path: Path) -> None:
    sbom = json.loads(json.dumps(CDX))
    sbom["metadata"]["component"]["version"] = "0.0.9"
    outcome, reason = verdicts(write(tmp_path, example(), sbom))["CE-GOV-04"]
    assert outcome is Outcome.FAIL
    assert reason == "the SBOM is of cityedge-firmware 0.0.9, the declaration of firmware 0.1.0"


def test_an_sbom_that_is_no_sbom_fails_with_why(tmp_path: Path) -> None:
    outcome, reason = verdicts(write(tmp_path, example(), "<html>not an sbom</html>"))[
        "CE-GOV-04"]
    assert outcome is Outcome.FAIL
    assert reason.endswith("not an SBOM (CycloneDX JSON, SPDX JSON or SPDX tag-value)")


SPDX_TV = """SPDXVersion: SPDX-2.3
DataLicense: CC0-1.0
SPDXID: SPDXRef-DOCUMENT
DocumentName: aq-200-firmware
DocumentNamespace: https://sensors.example/spdx/aq-200-0.1.0
Creator: Organization: Example Sensors Oy
Created: 2026-12-01T09:00:00Z

PackageName: cityedge-firmware
SPDXID: SPDXRef-fw
PackageVersion: 0.1.0
PackageDownloadLocation: NOASSERTION
FilesAnalyzed: false

PackageName: MicroPython
SPDXID: SPDXRef-mp
PackageVersion: 1.28.0
PackageDownloadLocation: https://github.com/micropython/micropython
FilesAnalyzed: false

PackageName: ESP-IDF
SPDXID: SPDXRef-idf
PackageVersion: v5.5.1
PackageDownloadLocation: NOASSERTION
FilesAnalyzed: false

PackageName: mbed TLS
SPDXID: SPDXRef-tls
PackageVersion: 3.6.4
PackageDownloadLocation: NOASSERTION
FilesAnalyzed: false
"""


def test_spdx_tag_value_and_json_are_read_by_the_spdx_library() -> None:
    tv = parse_sbom(SPDX_TV.encode(), "sbom.spdx")
    assert tv.format == "SPDX-2.3"
    assert check_components(tv, "esp32", "0.1.0").outcome is Outcome.PASS
    doc = {"spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
           "name": "aq", "documentNamespace": "https://sensors.example/spdx/aq",
           "creationInfo": {"created": "2026-12-01T09:00:00Z",
                            "creators": ["Organization: Example Sensors Oy"]},
           "packages": [{"SPDXID": "SPDXRef-%d" % i, "name": n, "versionInfo": v,
                         "downloadLocation": "NOASSERTION", "filesAnalyzed": False}
                        for i, (n, v) in enumerate([("micropython", "1.28.0"),
                                                    ("cityedge-firmware", "0.1.0")])]}
    js = parse_sbom(json.dumps(doc).encode(), "sbom.spdx.json")
    verdict = check_components(js, "esp32", "0.1.0")
    assert (verdict.outcome, verdict.reason) == (Outcome.FAIL,
                                                 "the SBOM does not list esp-idf, mbedtls")
    with pytest.raises(EvidenceError, match="not an SPDX document"):
        parse_sbom(SPDX_TV.replace("SPDXID: SPDXRef-DOCUMENT\n", "").encode())
