"""Part 3 of ``make demo``: a vendor's chip against the city's guidelines.

Two eFuse captures bundled with the hardware checker (real ``espefuse summary --format
json`` output of esptool's virtual ESP32-S3: factory state, and after the hardening the
research notes burned), each with the example vendor declaration, go through what
``cityedge hw check --profile city-baseline`` runs; the two reports (HTML and JSON) are
written and shown side by side: the summary of each, then the requirements the eFuses
decide. Neither meets the baseline: the "hardened" capture still fails four eFuse rows
(flash encryption in development mode, key blocks without a digest or key, and a crypt
counter that is not write-protected, so the configuration is not locked), which is what a
lab finds weeks later and the checker finds at once; and no probe here saw the network or
the firmware, so those requirements stay "could not decide".
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cityedge_hardware.check import CheckInputs, check_report
from cityedge_hardware.efuse_rules import EFUSE_REQUIREMENTS
from cityedge_hardware.evidence import load_declaration
from cityedge_hardware.report import OUTCOMES
from cityedge_hardware.report_html import write_reports

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "demo" / "hw-check"
CAPTURES = (("factory ESP32-S3", "factory", "esp32s3.json"),
            ("'hardened' ESP32-S3", "hardened", "esp32s3_hardened.json"))
_COLOUR = {"pass": "green", "fail": "red", "could not decide": "yellow",
           "needs evidence": "dark_orange", "not applicable": "dim"}


def _run(name: str, out: Path) -> tuple[dict[str, Any], Path, Path]:
    pkg = resources.files("cityedge_hardware")
    capture = Path(str(pkg.joinpath("captures", name)))
    decl = load_declaration(Path(str(pkg.joinpath("examples", "vendor.yaml"))))
    doc = check_report(CheckInputs(platform="esp32", efuse_json=capture, declaration=decl),
                       "city-baseline")
    json_path, html_path = write_reports(doc, out)
    return doc, json_path, html_path


def main(con: Console, out_dir: Path = OUT) -> None:
    con.rule("[bold]cityedge demo, part 3: a vendor's chip against the city's guidelines")
    results = [(label, *_run(name, out_dir / sub)) for label, sub, name in CAPTURES]
    table = Table(title="cityedge hw check --profile city-baseline --efuse-json CAPTURE "
                  "--evidence examples/vendor.yaml --out DIR, two captures side by side")
    table.add_column("")
    for label, doc, _, _ in results:
        table.add_column("%s (%s)" % (label, doc["device"]["chip"]))
    table.add_row("profile city-baseline", *("[bold %s]%s[/]" % (
        "green" if doc["summary"]["met"] else "red",
        "MET" if doc["summary"]["met"] else "NOT MET") for _, doc, _, _ in results))
    for outcome in OUTCOMES:
        table.add_row(outcome, *(str(doc["summary"]["counts"][outcome])
                                 for _, doc, _, _ in results))
    table.add_section()
    rows = [{r["id"]: r for r in doc["requirements"]} for _, doc, _, _ in results]
    for req in EFUSE_REQUIREMENTS:
        cells = ["[%s]%s[/]: %s" % (_COLOUR[r[req]["outcome"]], r[req]["outcome"],
                                    r[req]["reason"]) for r in rows]
        table.add_row("%s\n%s" % (req, rows[0][req]["text"]), *cells)
    con.print(table)
    for label, _, json_path, html_path in results:
        con.print("   %s: %s  (and %s)" % (label, html_path, json_path.name))
    passed = [sum(rows_i[req]["outcome"] == "pass" for req in EFUSE_REQUIREMENTS)
              for rows_i in rows]
    if not passed[0] < passed[1]:
        con.print("[red]cityedge: the hardened capture should pass more rows (%s)[/red]"
                  % passed)
        raise SystemExit(1)
    con.print("   %d of %d eFuse rows pass on the factory chip, %d on the 'hardened' one; "
              "each failing row names its fix\n   (open the HTML report; docs/VENDOR_GUIDE.md "
              "says in which order to burn)." % (passed[0], len(EFUSE_REQUIREMENTS),
                                                 passed[1]))
    con.rule("[bold green]demo complete")
