"""A hardware report as the fleet accepts it: ``check_report(data, limits)`` takes the bytes
a vendor uploaded and returns what the fleet keeps of them, or refuses them. No I/O.

The report is the JSON ``cityedge hw check`` writes (``"schema": "cityedge-hw-report/1"``).
The fleet reads only the fields below and keeps the whole document unchanged beside them;
every other field is allowed (a newer checker may add some). Its rules, in order; every
problem of a rule is listed, and the first rule with one refuses:

1. size and form: at most ``FleetLimits.hw_report_max_bytes``; UTF-8 JSON with no key
   twice in one object (two parsers could read different values of a duplicate ``met``);
   the fields the fleet reads have their types and limits (``HwReportIn``), and the text
   the fleet stores in its columns has no control characters;
2. the report is one of a bundled profile (``cityedge hw catalogue``) and of the catalogue
   version this fleet has: a report of another version cannot be compared;
3. each requirement is listed once, and every one the profile selects is listed (a report
   that leaves out a failing requirement is not a shorter passing report);
4. ``summary.counts`` are the counts of the outcomes, and ``summary.met`` is
   ``cityedge_hardware.report.profile_met`` of them (the checker's own rule): the fleet
   decides ``met`` itself and refuses a report whose summary says otherwise (a forged or
   hand-edited summary).

What this does not prove: the report is the vendor's own statement. The fleet checks it is
whole and consistent, and keeps its SHA-256, the uploader and the time (the audit log has
them too); the inputs' hashes inside it let the city rerun the check on the same captures.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from cityedge_core.errors import PeerError
from cityedge_fleet.config import FleetLimits
from cityedge_fleet.models import CONTROL_CHARACTERS, HW_PROFILE_MAX, HW_VERSION_MAX, TEXT_MAX
from cityedge_hardware.report import outcome_counts, profile_met

SCHEMA_ID = "cityedge-hw-report/1"


class Outcome(StrEnum):
    """A requirement's outcome in a report."""

    passed = "pass"
    failed = "fail"
    needs_evidence = "needs evidence"
    not_applicable = "not applicable"
    undecided = "could not decide"


Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=TEXT_MAX)]
Short = Annotated[str, StringConstraints(min_length=1, max_length=HW_VERSION_MAX)]
ProfileName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,47}$",
                                               max_length=HW_PROFILE_MAX)]
ReqId = Annotated[str, StringConstraints(pattern=r"^CE-[A-Z]+-\d{2}$")]


class _Open(BaseModel):
    """A part of the report: the fields the fleet reads, checked; any other kept as is.
    Lax only where JSON has no type of its own (a time is a string); numbers and booleans
    are ``Strict*``: ``"true"`` is not ``true``."""

    model_config = ConfigDict(extra="allow")


class ReportTool(_Open):
    name: Short
    version: Short


class ReportCatalogue(_Open):
    name: Name
    version: StrictInt = Field(ge=1)
    sha256: Hex64


class ReportProfile(_Open):
    name: ProfileName
    sha256: Hex64


class ReportDevice(_Open):
    vendor: Name
    model: Name
    platform: Literal["esp32", "rp2040", "rpi-gateway"]
    chip: Name | None = None
    firmware: Name | None = None


class ReportSummary(_Open):
    met: StrictBool
    counts: dict[str, Annotated[StrictInt, Field(ge=0)]]


class ReportRequirement(_Open):
    id: ReqId
    outcome: Outcome
    checks: list[dict[str, Any]] = Field(default_factory=list)


class HwReportIn(_Open):
    schema_id: Literal["cityedge-hw-report/1"] = Field(alias="schema")
    tool: ReportTool
    generated_at: AwareDatetime
    catalogue: ReportCatalogue
    profile: ReportProfile
    device: ReportDevice
    summary: ReportSummary
    requirements: list[ReportRequirement] = Field(min_length=1)


class HwReportRefused(PeerError):
    """The report is refused: ``problems`` says each thing wrong, ``code`` names the rule."""

    def __init__(self, code: str, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.code = code
        self.problems = problems


@dataclass(frozen=True)
class AcceptedReport:
    """What the fleet keeps of a report beside its bytes."""

    report: HwReportIn
    met: bool
    counts: dict[str, int]
    generated_at: dt.datetime


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise HwReportRefused("form", ["the key %s appears twice in one object"
                                       % ", ".join(repr(k[:40]) for k in twice[:5])])
    return dict(pairs)


def _decode(data: bytes, limits: FleetLimits) -> Any:
    if len(data) > limits.hw_report_max_bytes:
        raise HwReportRefused("form", ["the report has %d bytes; at most %d"
                                       % (len(data), limits.hw_report_max_bytes)])
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise HwReportRefused("form", ["the report is not UTF-8 (byte %d)" % e.start]) from e
    except json.JSONDecodeError as e:
        raise HwReportRefused("form", ["the report is not JSON: %s at line %d column %d"
                                       % (e.msg, e.lineno, e.colno)]) from e
    except RecursionError as e:
        raise HwReportRefused("form", ["the report is nested too deeply"]) from e


def _field_problems(e: ValidationError) -> list[str]:
    """Where and what, never the value (a report may quote a secret the scan found)."""
    return ["%s: %s" % (".".join(str(p) for p in err["loc"]) or "report",
                        str(err["msg"]).removeprefix("Value error, "))
            for err in e.errors()[:20]]


def _stored_text(report: HwReportIn) -> dict[str, str | None]:
    """The report's text the fleet copies into columns (and shows in lists)."""
    return {"tool.version": report.tool.version, "catalogue.name": report.catalogue.name,
            "device.vendor": report.device.vendor, "device.model": report.device.model,
            "device.chip": report.device.chip, "device.firmware": report.device.firmware}


def _form(doc: Any, limits: FleetLimits) -> HwReportIn:
    """Rule 1 after decoding: the fields' types and limits."""
    if not isinstance(doc, dict):
        raise HwReportRefused("form", ["the report is a JSON object"])
    try:
        report = HwReportIn.model_validate(doc)
    except ValidationError as e:
        raise HwReportRefused("form", _field_problems(e)) from e
    problems = ["%s: control characters are not allowed" % where
                for where, text in _stored_text(report).items()
                if text is not None and CONTROL_CHARACTERS.search(text)]
    if len(report.requirements) > limits.hw_report_max_requirements:
        problems.append("the report lists %d requirements; at most %d"
                        % (len(report.requirements), limits.hw_report_max_requirements))
    checks = sum(len(r.checks) for r in report.requirements)
    if checks > limits.hw_report_max_checks:
        problems.append("the report has %d checks; at most %d"
                        % (checks, limits.hw_report_max_checks))
    if problems:
        raise HwReportRefused("form", problems)
    return report


def _profile_ids(report: HwReportIn) -> list[str]:
    """Rule 2: the ids the report's profile selects in this fleet's catalogue."""
    from cityedge_hardware.catalogue import bundled_profiles, load_catalogue, load_profile

    catalogue = load_catalogue()
    problems = []
    if report.profile.name not in bundled_profiles():
        problems.append("profile.name: %r is not a bundled profile (%s)"
                        % (report.profile.name, ", ".join(bundled_profiles())))
    if report.catalogue.version != catalogue.version:
        problems.append("catalogue.version: the report was made with catalogue version %d; "
                        "this fleet has version %d: run the checker of a cityedge with "
                        "catalogue version %d" % (report.catalogue.version, catalogue.version,
                                                  catalogue.version))
    if problems:
        raise HwReportRefused("profile", problems)
    return load_profile(report.profile.name, catalogue).ids()


def read_report(data: bytes, limits: FleetLimits) -> HwReportIn:
    """Rule 1 of the module docstring: the report's form (then the caller knows its model
    and can decide whether the uploader may use it); raises ``HwReportRefused``."""
    return _form(_decode(data, limits), limits)


def check_report(data: bytes, limits: FleetLimits) -> AcceptedReport:
    """Rules 1-4 of the module docstring; raises ``HwReportRefused``."""
    return accept_report(read_report(data, limits))


def accept_report(report: HwReportIn) -> AcceptedReport:
    """Rules 2-4 of the module docstring, on a report ``read_report`` returned; raises
    ``HwReportRefused``."""
    selected = _profile_ids(report)
    ids = [r.id for r in report.requirements]
    twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    missing = [i for i in selected if i not in set(ids)]
    problems = []
    if twice:
        problems.append("requirements listed more than once: %s" % ", ".join(twice[:20]))
    if missing:
        problems.append("the report leaves out %d requirement(s) profile %s selects: %s"
                        % (len(missing), report.profile.name, ", ".join(missing[:20])))
    if problems:
        raise HwReportRefused("requirements", problems)
    outcomes = [r.outcome.value for r in report.requirements]
    counts = outcome_counts(outcomes)
    met = profile_met(outcomes)
    claimed = {k: v for k, v in report.summary.counts.items() if v or k not in counts}
    if claimed != {k: v for k, v in counts.items() if v}:
        problems.append("summary.counts %s are not the counts of the requirements' outcomes "
                        "%s" % (json.dumps(report.summary.counts, sort_keys=True),
                                json.dumps(counts, sort_keys=True)))
    if report.summary.met != met:
        problems.append("summary.met is %s but the outcomes make it %s (met: every "
                        "requirement pass or not applicable)"
                        % (str(report.summary.met).lower(), str(met).lower()))
    if problems:
        raise HwReportRefused("summary", problems)
    return AcceptedReport(report=report, met=met, counts=counts,
                          generated_at=report.generated_at.astimezone(dt.UTC))
