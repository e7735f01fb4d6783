"""``docs/SECURITY.md`` names a test for every attack: each one it names must exist, so the
threat model cannot point at a test that was renamed or deleted."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import ast_source

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "SECURITY.md"
# "tests/x/test_y.py::test_z" and the "::test_w" that follow it in the same cell
REF = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def _tests_in(path: Path) -> set[str]:
    tree = ast_source.parse(path.read_text())
    tests = {node.name for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
             and node.name.startswith("test_")}
    # a hypothesis state machine's TestCase: ``TestX = Machine.TestCase`` or ``class TestX``
    tests |= {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id.startswith("Test")}
    tests |= {node.name for node in ast.walk(tree)
              if isinstance(node, ast.ClassDef) and node.name.startswith("Test")}
    return tests


def test_every_test_the_threat_model_names_exists() -> None:
    named: list[tuple[str, str]] = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            continue
        test_cell = line.rstrip(" |").rsplit("|", 1)[-1]
        current = None
        for path, name in REF.findall(test_cell):
            current = path or current
            assert current is not None, "a ::name without a file before it: %s" % line
            named.append((current, name))
    assert len(named) > 60
    missing = [(p, n) for p, n in named
               if not (ROOT / p).is_file() or n not in _tests_in(ROOT / p)]
    assert not missing, missing


def _attackers() -> set[str]:
    """The first column of the "## Attackers" table: the model every threat row names."""
    found: set[str] = set()
    in_table = False
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            in_table = line.startswith("## Attackers")
        elif in_table and line.startswith("| ") and not line.startswith("| attacker"):
            found.add(line.strip("|").split("|")[0].strip())
    return found


def test_every_row_names_an_attacker_of_the_model() -> None:
    attackers = _attackers()
    assert {"a stolen device", "the network", "anyone on the API"} <= attackers
    rows = 0
    in_threats = False
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            in_threats = line.startswith("## Threats")
        if in_threats and line.startswith("| ") and not line.startswith(("| asset", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == 5, line
            who = cells[1]
            assert who.startswith(tuple(attackers)) or who.startswith("("), line
            rows += 1
    assert rows > 50
