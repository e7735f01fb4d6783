"""The city's device guideline catalogue and its profiles, loaded from YAML and validated.

``catalogue.yaml`` (package data) holds the requirements: a stable id (``CE-<AREA>-NN``), the
city's own one-line text, its sources (EN 303 645 provisions, the TS 103 701 test cases of
each, OWASP ISVS ids, NIST IR 8259A capabilities), the platforms it applies to, how it is
decided (``probe``, ``evidence`` or ``both``), the probes it needs (declared in the same file)
and its severity. ``not_covered`` lists the source ids the catalogue leaves out, with why.

A profile (``profiles/<name>.yaml``, or a vendor's own file) selects requirements and tightens
them. Its rules, checked at load:

1. ``extends`` names a bundled profile; the chain has no cycle. A profile keeps every
   requirement of the one it extends: a profile can add, never drop.
2. ``select.min_severity`` adds every requirement at or above that severity;
   ``select.ids`` adds the named ones. Every id must exist in the catalogue.
3. ``tighten`` raises a selected requirement's severity; lowering one is refused.

Validation uses pydantic; every error names the file, the entry (requirement id or profile
key) and the field, all at once, so a vendor fixes a draft in one pass.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from cityedge_hardware.errors import CatalogueError
from cityedge_hardware.limits import LIMITS

Severity = Literal["low", "medium", "high", "critical"]
SEVERITY_ORDER: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}
Platform = Literal["esp32", "rp2040", "rpi-gateway"]

ReqId = Annotated[str, StringConstraints(pattern=r"^CE-[A-Z]+-\d{2}$")]
En303645Id = Annotated[str, StringConstraints(pattern=r"^(4|5\.\d{1,2}|6)-\d{1,2}$")]
Ts103701Id = Annotated[str, StringConstraints(pattern=r"^(4|5\.\d{1,2}|6)-\d{1,2}-\d{1,2}$")]
IsvsId = Annotated[str, StringConstraints(pattern=r"^[1-5]\.\d{1,2}\.\d{1,2}$")]
NistId = Literal["DI", "DC", "DP", "LA", "SU", "CS"]
ProbeId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,31}$")]
Text = Annotated[str, StringConstraints(min_length=10, max_length=400, strip_whitespace=True)]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class Sources(BaseModel):
    model_config = _STRICT
    en303645: list[En303645Id] = []
    ts103701: list[Ts103701Id] = []
    isvs: list[IsvsId] = []
    nist8259a: list[NistId] = []


class Requirement(BaseModel):
    """One guideline: what must hold, where it comes from, and how it is decided."""

    model_config = _STRICT
    id: ReqId
    text: Text
    area: Annotated[str, StringConstraints(pattern=r"^[a-z]{2,20}$")]
    severity: Severity
    platforms: list[Platform] = Field(min_length=1)
    decided_by: Literal["probe", "evidence", "both"]
    probes: list[ProbeId] = []
    evidence: Text | None = None
    sources: Sources


class Probe(BaseModel):
    model_config = _STRICT
    platforms: list[Platform] = Field(min_length=1)
    text: Text


class NotCovered(BaseModel):
    model_config = _STRICT
    sources: Sources
    reason: Text


class _Header(BaseModel):
    model_config = _STRICT
    name: str
    version: int
    basis: list[str]
    note: str


class _CatalogueFile(BaseModel):
    model_config = _STRICT
    catalogue: _Header
    platforms: dict[Platform, str]
    probes: dict[ProbeId, Probe]
    requirements: list[Requirement] = Field(min_length=1)
    not_covered: list[NotCovered] = []


class _Select(BaseModel):
    model_config = _STRICT
    min_severity: Severity | None = None
    ids: list[ReqId] = []


class _ProfileFile(BaseModel):
    model_config = _STRICT
    profile: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,47}$")]
    title: Text
    extends: str | None = None
    select: _Select = _Select()
    tighten: dict[ReqId, Severity] = {}


@dataclass(frozen=True)
class Catalogue:
    requirements: tuple[Requirement, ...]
    probes: dict[str, Probe]
    not_covered: tuple[NotCovered, ...]
    version: int
    name: str = "cityedge device guidelines"

    def get(self, req_id: str) -> Requirement | None:
        for r in self.requirements:
            if r.id == req_id:
                return r
        return None


@dataclass(frozen=True)
class Selected:
    """A requirement as a profile asks for it: its severity may be raised."""

    requirement: Requirement
    severity: str


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    chain: tuple[str, ...]  # this profile, then the ones it extends
    selected: tuple[Selected, ...]  # in catalogue order

    def ids(self) -> list[str]:
        return [s.requirement.id for s in self.selected]


def _read_yaml(data: bytes, source: str) -> object:
    if len(data) > LIMITS.catalogue_max_bytes:
        raise CatalogueError("%s: %d bytes, more than %d" % (source, len(data),
                                                             LIMITS.catalogue_max_bytes))
    try:
        # the C loader when PyYAML has it (10x faster); both are the safe loader
        return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except yaml.YAMLError as e:
        raise CatalogueError("%s: not valid YAML: %s" % (source, e)) from e


def _entry_name(doc: object, loc: tuple[int | str, ...]) -> str:
    """``requirements[3].text`` -> ``requirement CE-BOOT-01, field text``."""
    if len(loc) >= 2 and loc[0] == "requirements" and isinstance(loc[1], int) \
            and isinstance(doc, dict):
        reqs = doc.get("requirements")
        rid = None
        if isinstance(reqs, list) and loc[1] < len(reqs) and isinstance(reqs[loc[1]], dict):
            rid = reqs[loc[1]].get("id")
        field = ".".join(str(p) for p in loc[2:]) or "entry"
        return "requirement %s, field %s" % (rid or "#%d" % (loc[1] + 1), field)
    return "field " + (".".join(str(p) for p in loc) or "(top)")


def _errors(source: str, doc: object, e: ValidationError) -> CatalogueError:
    lines = ["%s: %s" % (_entry_name(doc, tuple(err["loc"])), err["msg"])
             for err in e.errors()[:20]]
    return CatalogueError("%s does not hold:\n  %s" % (source, "\n  ".join(lines)))


def parse_catalogue(data: bytes, source: str = "catalogue.yaml") -> Catalogue:
    """Validate a catalogue file; ``CatalogueError`` lists every problem with its entry."""
    doc = _read_yaml(data, source)
    try:
        parsed = _CatalogueFile.model_validate(doc)
    except ValidationError as e:
        raise _errors(source, doc, e) from e
    problems: list[str] = []
    seen: set[str] = set()
    for r in parsed.requirements:
        if r.id in seen:
            problems.append("requirement %s: the id is used twice" % r.id)
        seen.add(r.id)
        for p in r.probes:
            probe = parsed.probes.get(p)
            if probe is None:
                problems.append("requirement %s, field probes: unknown probe %r" % (r.id, p))
            elif not set(probe.platforms) & set(r.platforms):
                problems.append("requirement %s, field probes: %s runs on none of its "
                                "platforms" % (r.id, p))
        if r.decided_by in ("probe", "both") and not r.probes:
            problems.append("requirement %s, field probes: decided_by %s needs a probe"
                            % (r.id, r.decided_by))
        if r.decided_by in ("evidence", "both") and not r.evidence:
            problems.append("requirement %s, field evidence: decided_by %s needs the "
                            "evidence a vendor supplies" % (r.id, r.decided_by))
        if r.decided_by == "evidence" and r.probes:
            problems.append("requirement %s, field probes: decided_by evidence lists probes"
                            % r.id)
        s = r.sources
        if not (s.en303645 or s.isvs or s.nist8259a):
            problems.append("requirement %s, field sources: no source id" % r.id)
        groups = {tc.rsplit("-", 1)[0] for tc in s.ts103701}
        if not groups <= set(s.en303645):
            problems.append("requirement %s, field sources.ts103701: test cases of %s, "
                            "a provision not in en303645" % (r.id, sorted(groups -
                                                                         set(s.en303645))))
    if problems:
        raise CatalogueError("%s does not hold:\n  %s" % (source, "\n  ".join(problems)))
    return Catalogue(requirements=tuple(parsed.requirements), probes=dict(parsed.probes),
                     not_covered=tuple(parsed.not_covered), version=parsed.catalogue.version,
                     name=parsed.catalogue.name)


def _package_file(*parts: str) -> bytes:
    return resources.files("cityedge_hardware").joinpath(*parts).read_bytes()


@functools.cache
def load_catalogue() -> Catalogue:
    """The bundled catalogue (read once per process)."""
    return parse_catalogue(_package_file("catalogue.yaml"))


def bundled_profiles() -> list[str]:
    folder = resources.files("cityedge_hardware").joinpath("profiles")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _profile_file(data: bytes, source: str) -> _ProfileFile:
    doc = _read_yaml(data, source)
    try:
        return _ProfileFile.model_validate(doc)
    except ValidationError as e:
        raise _errors(source, doc, e) from e


_NAME = re.compile(r"^[a-z][a-z0-9-]{1,47}$")


def _bundled(name: str) -> tuple[bytes, str]:
    if not _NAME.match(name) or name not in bundled_profiles():
        raise CatalogueError("no profile %r" % name,
                             hint="bundled profiles: %s; or pass a path to a .yaml file"
                             % ", ".join(bundled_profiles()))
    return _package_file("profiles", name + ".yaml"), "profile %s" % name


def profile_source(name_or_path: str) -> tuple[bytes, str]:
    """A profile file's bytes and how to name it: a bundled profile, or a path to one."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        try:
            with path.open("rb") as f:
                return f.read(LIMITS.catalogue_max_bytes + 1), str(path)
        except OSError as e:
            raise CatalogueError("cannot read profile %s: %s" % (path, e.strerror or e),
                                 hint="check the path") from e
    return _bundled(name_or_path)


def catalogue_bytes() -> bytes:
    """The bundled catalogue file as it is (a report records its sha256)."""
    return _package_file("catalogue.yaml")


def load_profile(name_or_path: str, catalogue: Catalogue | None = None) -> Profile:
    """A bundled profile by name, or a vendor's profile file by path, resolved and checked."""
    cat = catalogue or load_catalogue()
    data, source = profile_source(name_or_path)
    files: list[tuple[_ProfileFile, str]] = []
    while True:
        pf = _profile_file(data, source)
        if any(f.profile == pf.profile for f, _ in files):
            raise CatalogueError("%s: profile %s extends itself (through %s)"
                                 % (source, pf.profile, " -> ".join(f.profile for f, _ in files)))
        files.append((pf, source))
        if pf.extends is None:
            break
        data, source = _bundled(pf.extends)
    severity: dict[str, str] = {}
    problems: list[str] = []
    for pf, src in reversed(files):  # the base first, so a child only adds and raises
        for r in cat.requirements:
            ms = pf.select.min_severity
            if ms is not None and SEVERITY_ORDER[r.severity] >= SEVERITY_ORDER[ms] \
                    and r.id not in severity:
                severity[r.id] = r.severity
        for rid in pf.select.ids:
            req = cat.get(rid)
            if req is None:
                problems.append("%s, select.ids: no requirement %s in the catalogue"
                                % (src, rid))
            elif rid not in severity:
                severity[rid] = req.severity
        for rid, sev in pf.tighten.items():
            if cat.get(rid) is None:
                problems.append("%s, tighten: no requirement %s in the catalogue" % (src, rid))
            elif rid not in severity:
                problems.append("%s, tighten.%s: the profile does not select it" % (src, rid))
            elif SEVERITY_ORDER[sev] < SEVERITY_ORDER[severity[rid]]:
                problems.append("%s, tighten.%s: %s would lower it from %s (a profile only "
                                "tightens)" % (src, rid, sev, severity[rid]))
            else:
                severity[rid] = sev
    if problems:
        raise CatalogueError("profile %s does not hold:\n  %s"
                             % (files[0][0].profile, "\n  ".join(problems)))
    top = files[0][0]
    return Profile(name=top.profile, title=top.title,
                   chain=tuple(f.profile for f, _ in files),
                   selected=tuple(Selected(r, severity[r.id]) for r in cat.requirements
                                  if r.id in severity))
