"""The JSON report (``cityedge-hw-report/1``): what the fleet stores and a machine reads.

``report_document`` builds it from a ``ProfileResult`` and the inputs; ``report.schema.json``
beside this module is its contract (JSON Schema 2020-12; the tests validate every report
against it, and the fleet accepts what it describes). The document names the catalogue
(name, version, sha256 of the file), the profile (name, sha256 of its file), the device, the
sha256 of every input file, the summary (met, and the count of each outcome) and each
requirement with its outcome, severity, checks (``Verdict.to_json()`` plus ``source``) and
fix. Texts from probes and files are cut to ``LIMITS.report_text_max_chars``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Any

from cityedge_hardware.catalogue import Catalogue
from cityedge_hardware.evidence import InputFile
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.report import ProfileResult

SCHEMA_ID = "cityedge-hw-report/1"


@dataclass(frozen=True)
class Device:
    vendor: str
    model: str
    platform: str
    chip: str | None = None
    firmware: str | None = None


def _cut(text: str) -> str:
    limit = LIMITS.report_text_max_chars
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _cut_all(value: Any) -> Any:
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, list):
        return [_cut_all(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut_all(v) for k, v in value.items()}
    return value


def tool_version() -> str:
    try:
        return metadata.version("cityedge")
    except metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


def report_document(result: ProfileResult, *, catalogue: Catalogue, catalogue_sha256: str,
                    profile_sha256: str, device: Device, inputs: list[InputFile],
                    generated_at: dt.datetime | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (shape: ``report.schema.json``)."""
    when = (generated_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    requirements = []
    for r in result.results:
        req = r.selected.requirement
        requirements.append({
            "id": req.id, "text": req.text, "severity": r.selected.severity,
            "decided_by": req.decided_by, "outcome": r.outcome, "reason": _cut(r.reason),
            "checks": [_cut_all(dict(c.verdict.to_json(), source=c.source)) for c in r.checks],
            "fix": _cut(r.fix)})
    return {
        "schema": SCHEMA_ID,
        "tool": {"name": "cityedge", "version": tool_version()},
        "generated_at": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "catalogue": {"name": catalogue.name, "version": catalogue.version,
                      "sha256": catalogue_sha256},
        "profile": {"name": result.profile.name, "title": result.profile.title,
                    "sha256": profile_sha256},
        "device": {"vendor": _cut(device.vendor), "model": _cut(device.model),
                   "platform": device.platform, "chip": device.chip,
                   "firmware": device.firmware},
        "inputs": [{"name": f.name, "source": _cut(f.source), "sha256": f.sha256}
                   for f in inputs],
        "summary": {"met": result.met, "counts": result.counts},
        "requirements": requirements,
    }


def schema() -> dict[str, Any]:
    """The JSON Schema of the report (package data)."""
    text = resources.files("cityedge_hardware").joinpath("report.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
