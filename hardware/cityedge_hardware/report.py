"""From verdicts to a report: one outcome per requirement the profile selects, and whether the
profile is met.

``decide(selected, platform, probe, evidence)`` is the one place an outcome is chosen. Its
rules, first match wins:

1. The requirement does not apply to the device's platform -> ``not applicable``.
2. A check (probe or evidence) failed -> ``fail``; the fix is each failing check's fix.
3. Decided by ``probe``: a check could not decide -> ``could not decide``; every check
   passed (at least one) -> ``pass``; no probe ran -> ``could not decide``, naming the
   probes that would.
4. Decided by ``evidence``: the declaration could not be checked -> ``could not decide``;
   its checks passed -> ``pass``; none -> ``needs evidence``, saying what the catalogue
   asks for.
5. Decided by ``both`` (a probe where one ran, else the declaration): a probe could not
   decide -> ``could not decide`` (a document does not override a probe); probes passed ->
   ``pass``; no probe ran and the declaration's checks passed -> ``pass``; neither ->
   ``needs evidence``.

A profile is **met** iff every requirement it selects is ``pass`` or ``not applicable`` (the
fleet applies the same rule to a stored report). Severities are the profile's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cityedge_hardware.catalogue import Profile, Selected
from cityedge_hardware.verdict import Outcome, Verdict

PASS = "pass"  # noqa: S105 (an outcome, not a password)
FAIL = "fail"
NEEDS_EVIDENCE = "needs evidence"
NOT_APPLICABLE = "not applicable"
UNDECIDED = "could not decide"
OUTCOMES = (PASS, FAIL, NEEDS_EVIDENCE, NOT_APPLICABLE, UNDECIDED)
MET_OUTCOMES = frozenset({PASS, NOT_APPLICABLE})


def profile_met(outcomes: Iterable[str]) -> bool:
    """The one rule (this report and the fleet's upload check): a profile is met iff every
    requirement it selects has outcome ``pass`` or ``not applicable``."""
    return all(outcome in MET_OUTCOMES for outcome in outcomes)


def outcome_counts(outcomes: Iterable[str]) -> dict[str, int]:
    """Requirements per outcome, every outcome named (0 when none has it)."""
    listed = list(outcomes)
    return {o: listed.count(o) for o in OUTCOMES}


@dataclass(frozen=True)
class Check:
    """A verdict as the report keeps it: with where it came from."""

    verdict: Verdict
    source: str  # "probe" or "evidence"


@dataclass(frozen=True)
class RequirementResult:
    selected: Selected
    outcome: str
    reason: str
    checks: tuple[Check, ...]
    fix: str

    @property
    def id(self) -> str:
        return self.selected.requirement.id


@dataclass(frozen=True)
class ProfileResult:
    profile: Profile
    platform: str
    results: tuple[RequirementResult, ...]

    @property
    def counts(self) -> dict[str, int]:
        return outcome_counts(r.outcome for r in self.results)

    @property
    def met(self) -> bool:
        return profile_met(r.outcome for r in self.results)


def _fixes(checks: Iterable[Check]) -> str:
    seen: list[str] = []
    for c in checks:
        if c.verdict.fix and c.verdict.fix not in seen:
            seen.append(c.verdict.fix)
    return "; ".join(seen)


def decide(selected: Selected, platform: str, probe: list[Verdict],
           evidence: list[Verdict]) -> RequirementResult:
    """The requirement's outcome from its checks (rules in the module docstring)."""
    req = selected.requirement
    checks = tuple([Check(v, "probe") for v in probe] + [Check(v, "evidence") for v in evidence])

    def result(outcome: str, reason: str, fix: str = "") -> RequirementResult:
        return RequirementResult(selected, outcome, reason, checks, fix)

    if platform not in req.platforms:
        return result(NOT_APPLICABLE, "applies to %s, not to %s" % (", ".join(req.platforms),
                                                                   platform))
    failed = [c for c in checks if c.verdict.outcome is Outcome.FAIL]
    if failed:
        return result(FAIL, "; ".join(c.verdict.reason for c in failed), _fixes(failed))
    probes_wanted = "no probe that decides it ran (%s)" % ", ".join(req.probes)
    asked = "declare it in the evidence file: %s" % (req.evidence or "")
    undecided = [c for c in checks if c.source == "probe"
                 and c.verdict.outcome is Outcome.UNDECIDED]
    if req.decided_by in ("probe", "both") and undecided:
        return result(UNDECIDED, "; ".join(c.verdict.reason for c in undecided),
                      _fixes(undecided))
    if req.decided_by in ("probe", "both") and probe:
        return result(PASS, "; ".join(v.reason for v in probe))
    if req.decided_by == "probe":
        return result(UNDECIDED, probes_wanted,
                      "run the check with the input these probes need "
                      "(docs/VENDOR_GUIDE.md lists them)")
    undecided = [c for c in checks if c.source == "evidence"
                 and c.verdict.outcome is Outcome.UNDECIDED]
    if undecided:
        return result(UNDECIDED, "; ".join(c.verdict.reason for c in undecided),
                      _fixes(undecided))
    if evidence:
        return result(PASS, "; ".join(v.reason for v in evidence))
    if req.decided_by == "both":
        return result(NEEDS_EVIDENCE, "%s and the declaration does not cover it"
                      % probes_wanted, asked)
    return result(NEEDS_EVIDENCE, "the declaration does not cover it", asked)


def evaluate(profile: Profile, platform: str, probe: list[Verdict],
             evidence: list[Verdict]) -> ProfileResult:
    """Every requirement the profile selects, in catalogue order, with its outcome."""
    by_probe: dict[str, list[Verdict]] = {}
    by_evidence: dict[str, list[Verdict]] = {}
    for v in probe:
        by_probe.setdefault(v.requirement, []).append(v)
    for v in evidence:
        by_evidence.setdefault(v.requirement, []).append(v)
    return ProfileResult(profile, platform, tuple(
        decide(s, platform, by_probe.get(s.requirement.id, []),
               by_evidence.get(s.requirement.id, []))
        for s in profile.selected))
