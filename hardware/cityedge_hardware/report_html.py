"""The HTML report: one page a person reads, rendered from the JSON report's document.

A banner first (green "MET" or red "NOT MET" with the count of each outcome), then every
requirement with its outcome, the reason, the checks and evidence that decided it, and the
fix; then the inputs with their sha256. The page is self-contained (inline CSS, no script,
no external asset; a Content-Security-Policy of ``default-src 'none'`` says so to the
browser) and every value is HTML-escaped by Jinja2's autoescape: a capture, a declaration or
a board's answer that holds markup shows as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from cityedge_hardware.errors import CheckInputError
from cityedge_hardware.report_json import encode
from cityedge_host.files import write_atomic

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("cityedge_hardware", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False)


def render_html(doc: dict[str, Any]) -> str:
    """The page for a report document (``report_json.report_document``'s output)."""
    return _ENV.get_template("report.html.j2").render(**doc)


def write_reports(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (created), each atomically."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, html_path = out_dir / "report.json", out_dir / "report.html"
        write_atomic(json_path, encode(doc), mode=0o644)
        write_atomic(html_path, render_html(doc).encode(), mode=0o644)
    except OSError as e:
        raise CheckInputError("cannot write the report into %s: %s" % (out_dir,
                                                                      e.strerror or e),
                              hint="give --out a directory you can write") from e
    return json_path, html_path
