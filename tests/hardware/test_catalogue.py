"""The guideline catalogue and its profiles: schema, source ids, coverage of the draft, rules.

The source ids are checked against the research indexes (TS 103 701 test cases, ISVS 1.0
requirement ids) kept outside the repository in ``../shared/research``. When that folder is
absent the cross-checks skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from cityedge_hardware.catalogue import (
    SEVERITY_ORDER,
    bundled_profiles,
    load_catalogue,
    load_profile,
    parse_catalogue,
)
from cityedge_hardware.efuse_rules import EFUSE_REQUIREMENTS
from cityedge_hardware.errors import CatalogueError

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ROOT.parent / "shared" / "research"


@pytest.fixture(scope="module")
def research() -> Path:
    if not RESEARCH.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("the research indexes are missing: %s" % RESEARCH)
        pytest.skip("no research folder beside the repository (%s)" % RESEARCH)
    return RESEARCH


def _catalogue_doc() -> dict[str, Any]:
    path = ROOT / "hardware" / "cityedge_hardware" / "catalogue.yaml"
    doc: dict[str, Any] = yaml.safe_load(path.read_bytes())
    return doc


def test_the_bundled_catalogue_loads() -> None:
    cat = load_catalogue()
    ids = [r.id for r in cat.requirements]
    assert len(ids) == len(set(ids)) == 84


def test_every_efuse_rule_decides_a_catalogue_requirement_with_the_efuse_probe() -> None:
    cat = load_catalogue()
    for rid in EFUSE_REQUIREMENTS:
        req = cat.get(rid)
        assert req is not None, rid
        assert "esp-efuse" in req.probes
        assert "esp32" in req.platforms


def test_source_ids_exist_in_the_research_indexes(research: Path) -> None:
    cases = json.loads((research / "ts103701_index.json").read_text())["cases"]
    ts_ids = {c.split()[0] for group in cases.values() for c in group}
    isvs_ids = {r["id"] for r in json.loads((research / "isvs_1.0_requirements.json")
                                            .read_text())}
    cat = load_catalogue()
    sources = [r.sources for r in cat.requirements] + [n.sources for n in cat.not_covered]
    for s in sources:
        assert set(s.en303645) <= set(cases), s.en303645
        assert set(s.ts103701) <= ts_ids, s.ts103701
        assert set(s.isvs) <= isvs_ids, s.isvs
    # each provision carries all of its test cases
    for r in cat.requirements:
        expected = {c.split()[0] for p in r.sources.en303645 for c in cases[p]}
        assert set(r.sources.ts103701) == expected, r.id


def test_every_draft_entry_is_covered_or_left_out_with_a_reason(research: Path) -> None:
    draft = yaml.safe_load((research / "guidelines-catalogue-draft.yaml").read_bytes())
    prefix = {"en303645": "ETSI-EN303645-", "isvs": "OWASP-ISVS-", "nist8259a": "NIST-IR8259A-"}
    cat = load_catalogue()
    covered: set[str] = set()
    left_out: set[str] = set()
    for target, items in ((covered, cat.requirements), (left_out, cat.not_covered)):
        for item in items:
            for key, pre in prefix.items():
                target |= {pre + x for x in getattr(item.sources, key)}
    draft_ids = {r["id"] for r in draft["requirements"]}
    assert draft_ids == covered | left_out
    assert not covered & left_out
    assert (len(draft_ids), len(covered), len(left_out)) == (243, 219, 24)


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d["requirements"][0].update(severity="urgent"),
     "requirement CE-GOV-01, field severity"),
    (lambda d: d["requirements"][1].update(probes=["no-such-probe"]),
     "requirement CE-GOV-02, field probes: unknown probe"),
    (lambda d: d["requirements"][2].update(id="CE-GOV-01"), "CE-GOV-01: the id is used twice"),
    (lambda d: d["requirements"][3]["sources"].update(isvs=[1.2]),
     "requirement CE-GOV-04, field sources.isvs.0"),
    (lambda d: d["requirements"][4].pop("evidence"),
     "requirement CE-GOV-05, field evidence: decided_by both needs"),
    (lambda d: d["requirements"][5]["sources"].update(ts103701=["5.1-1-1"]),
     "requirement CE-GOV-06, field sources.ts103701"),
    (lambda d: d["requirements"][6].update(colour="red"),
     "requirement CE-GOV-07, field colour"),
])
def test_a_bad_catalogue_names_the_requirement_and_the_field(edit: Any, words: str) -> None:
    doc = _catalogue_doc()
    edit(doc)
    with pytest.raises(CatalogueError) as e:
        parse_catalogue(yaml.safe_dump(doc).encode(), "edited.yaml")
    assert words in str(e.value)


def test_bundled_profiles_tighten_and_only_add() -> None:
    assert bundled_profiles() == ["city-baseline", "city-critical", "vendor-draft-example"]
    cat = load_catalogue()
    base = load_profile("city-baseline", cat)
    crit = load_profile("city-critical", cat)
    assert crit.chain == ("city-critical", "city-baseline")
    assert set(base.ids()) < set(crit.ids())
    base_sev = {s.requirement.id: s.severity for s in base.selected}
    for s in crit.selected:
        assert SEVERITY_ORDER[s.severity] >= SEVERITY_ORDER[s.requirement.severity]
        if s.requirement.id in base_sev:
            assert SEVERITY_ORDER[s.severity] >= SEVERITY_ORDER[base_sev[s.requirement.id]]
    # the baseline holds every critical requirement, including every eFuse one
    assert {r.id for r in cat.requirements if r.severity == "critical"} <= set(base.ids())
    assert set(EFUSE_REQUIREMENTS) <= set(base.ids())


def _vendor(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "vendor.yaml"
    path.write_text("profile: acme-draft\ntitle: ACME gateway draft profile\n" + body)
    return path


def test_a_vendor_profile_file_extends_the_baseline(tmp_path: Path) -> None:
    path = _vendor(tmp_path, "extends: city-baseline\nselect:\n  ids: [CE-NET-09]\n"
                   "tighten:\n  CE-NET-09: critical\n")
    prof = load_profile(str(path))
    sev = {s.requirement.id: s.severity for s in prof.selected}
    assert sev["CE-NET-09"] == "critical"
    assert set(load_profile("city-baseline").ids()) < set(sev)


@pytest.mark.parametrize(("body", "words"), [
    ("extends: city-baseline\ntighten:\n  CE-BOOT-01: low\n",
     "tighten.CE-BOOT-01: low would lower it from critical"),
    ("extends: city-baseline\nselect:\n  ids: [CE-XYZ-01]\n", "no requirement CE-XYZ-01"),
    ("extends: city-baseline\ntighten:\n  CE-CRYPTO-03: high\n",
     "tighten.CE-CRYPTO-03: the profile does not select it"),
    ("extends: nowhere\n", "no profile 'nowhere'"),
    ("extends: city-baseline\ndrop: [CE-BOOT-01]\n", "field drop"),
])
def test_a_vendor_profile_that_loosens_or_misnames_is_refused(tmp_path: Path, body: str,
                                                              words: str) -> None:
    with pytest.raises(CatalogueError) as e:
        load_profile(str(_vendor(tmp_path, body)))
    assert words in str(e.value)


def test_a_profile_cycle_is_refused(tmp_path: Path) -> None:
    path = _vendor(tmp_path, "extends: city-baseline\n")
    path.write_text(path.read_text().replace("acme-draft", "city-baseline"))
    with pytest.raises(CatalogueError, match="extends itself"):
        load_profile(str(path))
