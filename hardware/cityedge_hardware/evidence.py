"""The vendor's declaration: what no probe can see (disclosure policy, support period, update
policy, SBOM, documents), checked for presence and form, as verdicts on catalogue requirements.

The file is YAML (``examples/vendor.yaml`` is a complete one), read in two steps:

* ``load_declaration(path)`` reads and validates its structure (pydantic, strict, unknown
  keys refused, every size bounded by ``LIMITS``). A file that does not hold is
  ``EvidenceError`` listing every bad field at once: the check does not run on it.
* ``check_declaration(decl, today=...)`` decides, one verdict per item given (an item left
  out gives no verdict: the report shows its requirement as "needs evidence"):

  1. ``vulnerability_disclosure`` -> CE-GOV-02: its ``url`` is https with a host;
     ``response_days`` says when reporters hear back. With ``fix_days`` and
     ``customer_notice`` also -> CE-GOV-03.
  2. ``support`` -> CE-GOV-05: ``end`` is after today, the ``url`` that publishes it is
     https, ``notice_months`` (the warning before the end) is at least 1.
  3. ``update_policy`` -> CE-UPD-08: ``security_fix_days`` given and
     ``security_only_releases`` true (a fix can ship without feature changes), https url.
  4. ``sbom`` -> CE-GOV-04: the file (beside the declaration, bounded) is CycloneDX or SPDX
     and lists the firmware's components (``sbom.check_components``). A file that cannot be
     read or parsed fails the requirement, with why.
  5. ``documents`` -> the requirement each is filed under (only requirements the catalogue
     decides by ``evidence`` or ``both``): a readable file beside the declaration or an
     https URL. The checker sees that the document exists, not what it says: the verdict
     says "declared", and the city reviews it.

Every file read is hashed (sha256) for the report's ``inputs``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from cityedge_hardware.catalogue import Catalogue, Platform, ReqId, load_catalogue
from cityedge_hardware.errors import EvidenceError
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.sbom import check_components, parse_sbom
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

SCHEMA = "cityedge-vendor-declaration/1"
REQ_DISCLOSURE = "CE-GOV-02"
REQ_HANDLING = "CE-GOV-03"
REQ_SBOM = "CE-GOV-04"
REQ_SUPPORT = "CE-GOV-05"
REQ_SECURITY_RELEASES = "CE-UPD-08"

Text = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True,
                                        max_length=LIMITS.declaration_text_max_chars)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True)]
RelPath = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Days = Annotated[int, Field(ge=1, le=3650)]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Disclosure(BaseModel):
    model_config = _STRICT
    url: Url
    response_days: Days
    fix_days: Days | None = None
    customer_notice: Text | None = None


class _Support(BaseModel):
    model_config = _STRICT
    end: Annotated[dt.date, Field(strict=False)]  # YAML gives a date; "2031-12-31" too
    url: Url
    notice_months: Annotated[int, Field(ge=0, le=120)]


class _UpdatePolicy(BaseModel):
    model_config = _STRICT
    url: Url
    security_fix_days: Days
    security_only_releases: bool


class _SbomRef(BaseModel):
    model_config = _STRICT
    path: RelPath


class _Document(BaseModel):
    model_config = _STRICT
    title: Text
    path: RelPath | None = None
    url: Url | None = None


class Declaration(BaseModel):
    """A vendor declaration as validated (the fields the module docstring names)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)
    schema_: Literal["cityedge-vendor-declaration/1"] = Field(alias="schema")
    vendor: Text
    model: Text
    platform: Platform
    firmware: Annotated[str, StringConstraints(pattern=r"^v?\d+(\.\d+){0,3}[0-9A-Za-z.+-]*$",
                                               max_length=40)]
    vulnerability_disclosure: _Disclosure | None = None
    support: _Support | None = None
    update_policy: _UpdatePolicy | None = None
    sbom: _SbomRef | None = None
    documents: Annotated[dict[ReqId, _Document],
                         Field(max_length=LIMITS.declaration_max_documents)] = {}


@dataclass(frozen=True)
class InputFile:
    """A file a report rests on: what it was given as, where, and its sha256."""

    name: str  # efuse-json, evidence, sbom, document CE-GOV-01, ...
    source: str
    sha256: str


@dataclass
class LoadedDeclaration:
    declaration: Declaration
    path: Path
    inputs: list[InputFile] = field(default_factory=list)


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The file's bytes, at most ``limit``; ``EvidenceError`` when unreadable or larger."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise EvidenceError("cannot read the %s %s: %s" % (what, path, e.strerror or e)) from e
    if len(data) > limit:
        raise EvidenceError("the %s %s is larger than %d bytes" % (what, path, limit))
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _field_errors(source: str, e: ValidationError) -> EvidenceError:
    lines = ["%s: %s" % (".".join(str(p) for p in err["loc"]) or "(top)", err["msg"])
             for err in e.errors()[:20]]
    return EvidenceError("%s is not a vendor declaration:\n  %s" % (source, "\n  ".join(lines)))


def parse_declaration(data: bytes, source: str = "declaration",
                      catalogue: Catalogue | None = None) -> Declaration:
    """Validate a declaration's structure (module docstring); ``EvidenceError`` lists all."""
    if len(data) > LIMITS.declaration_max_bytes:
        raise EvidenceError("%s: %d bytes, more than %d" % (source, len(data),
                                                            LIMITS.declaration_max_bytes))
    try:
        doc = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except yaml.YAMLError as e:
        raise EvidenceError("%s: not valid YAML: %s" % (source, str(e)[:300])) from e
    try:
        decl = Declaration.model_validate(doc)
    except ValidationError as e:
        raise _field_errors(source, e) from e
    cat = catalogue or load_catalogue()
    problems = []
    for rid, d in decl.documents.items():
        req = cat.get(rid)
        if req is None:
            problems.append("documents.%s: no such requirement in the catalogue" % rid)
        elif req.decided_by == "probe":
            problems.append("documents.%s: decided by a probe only; a document cannot "
                            "decide it" % rid)
        if (d.path is None) == (d.url is None):
            problems.append("documents.%s: give exactly one of path and url" % rid)
    if problems:
        raise EvidenceError("%s is not a vendor declaration:\n  %s"
                            % (source, "\n  ".join(problems)))
    return decl


def load_declaration(path: Path, catalogue: Catalogue | None = None) -> LoadedDeclaration:
    data = read_bounded(path, LIMITS.declaration_max_bytes, "declaration")
    decl = parse_declaration(data, str(path), catalogue)
    return LoadedDeclaration(decl, path, [InputFile("evidence", str(path), sha256(data))])


def _https(url: str) -> str | None:
    """Why ``url`` is not an https URL with a host, or None when it is."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        return "%r is not an https URL" % url[:80]
    if not parts.hostname:
        return "%r names no host" % url[:80]
    return None


def _beside(loaded: LoadedDeclaration, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else loaded.path.parent / p


def _disclosure(d: _Disclosure) -> list[Verdict]:
    ev = (Evidence("vulnerability_disclosure.url", d.url),
          Evidence("vulnerability_disclosure.response_days", str(d.response_days)))
    bad = _https(d.url)
    out = [Verdict(REQ_DISCLOSURE, "disclosure-policy",
                   Outcome.FAIL if bad else Outcome.PASS,
                   bad or "a disclosure policy at %s; reporters hear back within %d days"
                   % (d.url, d.response_days), ev,
                   "publish the policy over https (security.txt, RFC 9116) and give its URL"
                   if bad else "")]
    if d.fix_days is not None and d.customer_notice is not None:
        out.append(Verdict(REQ_HANDLING, "vulnerability-handling", Outcome.PASS,
                           "declared: fixes within %d days; customers told by %s"
                           % (d.fix_days, d.customer_notice),
                           (Evidence("vulnerability_disclosure.fix_days", str(d.fix_days)),
                            Evidence("vulnerability_disclosure.customer_notice",
                                     d.customer_notice))))
    return out


def _support(s: _Support, today: dt.date) -> Verdict:
    ev = (Evidence("support.end", s.end.isoformat()), Evidence("support.url", s.url),
          Evidence("support.notice_months", str(s.notice_months)))
    problems = []
    if s.end <= today:
        problems.append("the support period ended on %s" % s.end.isoformat())
    bad = _https(s.url)
    if bad:
        problems.append(bad)
    if s.notice_months < 1:
        problems.append("no warning before the end (notice_months is 0)")
    if problems:
        return Verdict(REQ_SUPPORT, "support-period", Outcome.FAIL, "; ".join(problems), ev,
                       "publish a support end date in the future over https and warn "
                       "customers at least a month before it")
    return Verdict(REQ_SUPPORT, "support-period", Outcome.PASS,
                   "security updates until %s, published at %s, warned %d months before"
                   % (s.end.isoformat(), s.url, s.notice_months), ev)


def _update_policy(u: _UpdatePolicy) -> Verdict:
    ev = (Evidence("update_policy.url", u.url),
          Evidence("update_policy.security_fix_days", str(u.security_fix_days)),
          Evidence("update_policy.security_only_releases", str(u.security_only_releases)))
    problems = [p for p in (_https(u.url),) if p]
    if not u.security_only_releases:
        problems.append("security fixes ship only with feature releases")
    if problems:
        return Verdict(REQ_SECURITY_RELEASES, "update-policy", Outcome.FAIL,
                       "; ".join(problems), ev,
                       "publish a policy (https) under which a security fix ships on its "
                       "own, without feature changes")
    return Verdict(REQ_SECURITY_RELEASES, "update-policy", Outcome.PASS,
                   "security fixes ship on their own within %d days" % u.security_fix_days, ev)


def _sbom(loaded: LoadedDeclaration) -> Verdict:
    decl = loaded.declaration
    assert decl.sbom is not None
    path = _beside(loaded, decl.sbom.path)
    try:
        data = read_bounded(path, LIMITS.sbom_max_bytes, "SBOM")
        loaded.inputs.append(InputFile("sbom", str(path), sha256(data)))
        sbom = parse_sbom(data, str(path))
    except EvidenceError as e:
        return Verdict(REQ_SBOM, "sbom", Outcome.FAIL, str(e), (Evidence("sbom.path",
                                                                          str(path)),),
                       "give a CycloneDX (JSON) or SPDX (JSON or tag-value) SBOM of the "
                       "release beside the declaration")
    return check_components(sbom, decl.platform, decl.firmware, str(path))


def _document(loaded: LoadedDeclaration, rid: str, d: _Document) -> Verdict:
    if d.url is not None:
        bad = _https(d.url)
        ev = (Evidence("documents.%s.url" % rid, d.url, d.title),)
        if bad:
            return Verdict(rid, "declared-document", Outcome.FAIL, bad, ev,
                           "publish the document over https, or file it beside the "
                           "declaration and give its path")
        return Verdict(rid, "declared-document", Outcome.PASS,
                       "declared: %s (the city reviews it)" % d.title, ev)
    assert d.path is not None
    path = _beside(loaded, d.path)
    try:
        data = read_bounded(path, LIMITS.document_max_bytes, "document")
    except EvidenceError as e:
        return Verdict(rid, "declared-document", Outcome.FAIL, str(e),
                       (Evidence("documents.%s.path" % rid, str(path), d.title),),
                       "put the document beside the declaration under the path it names")
    digest = sha256(data)
    loaded.inputs.append(InputFile("document %s" % rid, str(path), digest))
    return Verdict(rid, "declared-document", Outcome.PASS,
                   "declared: %s (the city reviews it)" % d.title,
                   (Evidence("documents.%s.path" % rid, str(path), "sha256 " + digest),))


def check_declaration(loaded: LoadedDeclaration, *, today: dt.date | None = None
                      ) -> list[Verdict]:
    """The evidence verdicts, in the module docstring's order."""
    decl = loaded.declaration
    day = today or dt.datetime.now(dt.UTC).date()
    out: list[Verdict] = []
    if decl.vulnerability_disclosure is not None:
        out.extend(_disclosure(decl.vulnerability_disclosure))
    if decl.support is not None:
        out.append(_support(decl.support, day))
    if decl.update_policy is not None:
        out.append(_update_policy(decl.update_policy))
    if decl.sbom is not None:
        out.append(_sbom(loaded))
    out.extend(_document(loaded, rid, d) for rid, d in decl.documents.items())
    return out


EVIDENCE_REQUIREMENTS = (REQ_DISCLOSURE, REQ_HANDLING, REQ_SBOM, REQ_SUPPORT,
                         REQ_SECURITY_RELEASES)
