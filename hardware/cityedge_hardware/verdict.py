"""What a hardware check returns: a verdict per requirement, with its evidence and its fix."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    PASS = "pass"  # noqa: S105 (an outcome, not a password)
    FAIL = "fail"
    UNDECIDED = "could not decide"


@dataclass(frozen=True)
class Evidence:
    """One input a verdict rests on: the field (or tool line) and its raw value."""

    field: str
    raw: str
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    """The result of one check for one catalogue requirement."""

    requirement: str  # catalogue id, e.g. CE-BOOT-01
    check: str  # the rule's name, e.g. secure-boot
    outcome: Outcome
    reason: str  # one sentence: why this outcome
    evidence: tuple[Evidence, ...] = ()
    fix: str = ""  # what the vendor runs or does ("" when it passed)

    def to_json(self) -> dict[str, Any]:
        return {"requirement": self.requirement, "check": self.check,
                "outcome": self.outcome.value, "reason": self.reason,
                "evidence": [{"field": e.field, "raw": e.raw, "note": e.note}
                             for e in self.evidence],
                "fix": self.fix}
