"""Hardware reports as ``cityedge hw check`` writes them (``"schema":
"cityedge-hw-report/1"``), for the fleet's tests: ``make_report`` builds one for a model,
every requirement of a bundled profile with its outcome, and a summary that agrees (or,
given ``met``/``counts``, one that does not)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from sqlmodel import Session

from cityedge_fleet.auth import create_api_token
from cityedge_fleet.models import Role
from cityedge_hardware.catalogue import load_catalogue, load_profile

from support.fleet import Api

PROFILE = "city-baseline"
OUTCOMES = ("pass", "fail", "needs evidence", "not applicable", "could not decide")


def make_report(model: str, *, vendor: str = "acme", profile: str = PROFILE,
                outcomes: dict[str, str] | None = None, default: str = "pass",
                met: bool | None = None, counts: dict[str, int] | None = None,
                generated_at: str = "2026-12-04T10:00:00Z") -> dict[str, Any]:
    """A report of ``model`` for ``profile``: each requirement ``default`` unless
    ``outcomes`` names it; ``met`` and ``counts`` override the (true) summary."""
    catalogue = load_catalogue()
    chosen = outcomes or {}
    requirements = [
        {"id": s.requirement.id, "text": s.requirement.text, "severity": s.severity,
         "decided_by": s.requirement.decided_by,
         "outcome": chosen.get(s.requirement.id, default),
         "checks": [{"requirement": s.requirement.id, "check": "test",
                     "outcome": "pass", "reason": "made by the test", "evidence": [],
                     "fix": ""}],
         "fix": ""}
        for s in load_profile(profile, catalogue).selected]
    tally = Counter(r["outcome"] for r in requirements)
    true_counts = {o: tally.get(o, 0) for o in OUTCOMES}
    true_met = all(r["outcome"] in ("pass", "not applicable") for r in requirements)
    return {
        "schema": "cityedge-hw-report/1",
        "tool": {"name": "cityedge", "version": "0.1.0"},
        "generated_at": generated_at,
        "catalogue": {"name": "cityedge device guidelines", "version": catalogue.version,
                      "sha256": hashlib.sha256(b"catalogue").hexdigest()},
        "profile": {"name": profile, "sha256": hashlib.sha256(profile.encode()).hexdigest()},
        "device": {"vendor": vendor, "model": model, "platform": "esp32",
                   "chip": "ESP32-S3", "firmware": "1.2.0"},
        "inputs": [{"name": "efuse-json", "source": "efuse.json",
                    "sha256": hashlib.sha256(b"efuse").hexdigest()}],
        "summary": {"met": true_met if met is None else met,
                    "counts": true_counts if counts is None else counts},
        "requirements": requirements,
    }


def encode(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=1).encode()


def vendor_headers(api: Api, vendor: str | None) -> dict[str, str]:
    """A new vendor token for ``vendor`` (None: one made before vendors were named)."""
    with Session(api.engine) as session:
        _, token = create_api_token(session, name="vendor-%s" % vendor, role=Role.vendor,
                                    created_by="test", vendor=vendor)
        session.commit()
    return {"Authorization": "Bearer %s" % token}


def register_model(api: Api, name: str, vendor: str) -> None:
    r = api.client.post("/hw/models", json={"name": name, "vendor": vendor},
                        headers=api.headers(Role.security))
    assert r.status_code == 201, r.text


def upload(api: Api, headers: dict[str, str], report: dict[str, Any] | bytes) -> Any:
    data = report if isinstance(report, bytes) else encode(report)
    return api.client.post("/hw/reports", content=data,
                           headers={**headers, "Content-Type": "application/json"})
