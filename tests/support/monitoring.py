"""The metric names the deployed alert rules and dashboards use (``deploy/``), and the
names an exposition offers: a rule or a panel over a name no exporter has would stay
silent forever."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_NAME = re.compile(r"\b(cityedge_(?:fleet|gateway)_[a-z0-9_]+)")


def names_used(prefix: str) -> set[str]:
    """Every ``cityedge_<part>_...`` name in the alert rules and dashboards."""
    text = "".join(p.read_text() for p in [*DEPLOY.glob("prometheus/*.yml"),
                                           *DEPLOY.glob("grafana/*.json")]
                   if not p.name.endswith(".test.yml"))
    return {n for n in _NAME.findall(text) if n.startswith(prefix)}


def names_offered(exposition: str) -> set[str]:
    """Family and sample names (``_total``, ``_bucket``, ... included) of an exposition."""
    out: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        out.add(family.name)
        out.update(s.name for s in family.samples)
        if family.type == "counter":
            out.add(family.name + "_total")
        if family.type == "histogram":
            out.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return out
