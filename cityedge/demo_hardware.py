"""Part 3 of ``make demo``: a vendor's chip against the city's guidelines.

Two eFuse captures bundled with the hardware checker (real ``espefuse summary --format
json`` output of esptool's virtual ESP32-S3: factory state, and after the hardening the
research notes burned) are checked by the same rules ``cityedge hw efuse`` runs, and shown
side by side with the requirement each rule decides. The "hardened" capture still fails
three rows: its flash encryption is in development mode and its key blocks hold no
digest or key, which is what a lab finds weeks later and the checker finds at once.
"""

from __future__ import annotations

from importlib import resources

from rich.console import Console
from rich.table import Table

from cityedge_hardware.catalogue import load_catalogue
from cityedge_hardware.efuse_rules import check_summary
from cityedge_hardware.efuse_summary import parse_summary
from cityedge_hardware.verdict import Outcome

CAPTURES = (("factory ESP32-S3", "esp32s3.json"),
            ("'hardened' ESP32-S3", "esp32s3_hardened.json"))
_COLOUR = {Outcome.PASS: "green", Outcome.FAIL: "red", Outcome.UNDECIDED: "yellow"}


def main(con: Console) -> None:
    con.rule("[bold]cityedge demo, part 3: a vendor's chip against the city's guidelines")
    cat = load_catalogue()
    texts = {r.id: r.text for r in cat.requirements}
    results = []
    for label, name in CAPTURES:
        data = resources.files("cityedge_hardware").joinpath("captures", name).read_bytes()
        chip, verdicts = check_summary(parse_summary(data, source=name))
        results.append((label, chip, verdicts))
    table = Table(title="cityedge hw efuse --efuse-json CAPTURE, two captures side by side")
    table.add_column("requirement")
    for label, chip, _ in results:
        table.add_column("%s (%s)" % (label, chip))
    for row in zip(*(v for _, _, v in results), strict=True):
        req = row[0].requirement
        cells = ["[%s]%s[/%s]: %s" % (_COLOUR[v.outcome], v.outcome.value, _COLOUR[v.outcome],
                                      v.reason) for v in row]
        table.add_row("%s\n%s" % (req, texts.get(req, "")), *cells)
    con.print(table)
    passed = [sum(v.outcome is Outcome.PASS for v in verdicts) for _, _, verdicts in results]
    if not passed[0] < passed[1]:
        con.print("[red]cityedge: the hardened capture should pass more rows (%s)[/red]"
                  % passed)
        raise SystemExit(1)
    con.print("   %d of %d eFuse rows pass on the factory chip, %d on the 'hardened' one; "
              "each failing row names its fix\n   (cityedge hw efuse prints it; "
              "docs/VENDOR_GUIDE.md says in which order to burn)."
              % (passed[0], len(results[0][2]), passed[1]))
    con.rule("[bold green]demo complete")
