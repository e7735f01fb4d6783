"""Test modules share helpers through helper modules (``tests/support``, or a directory's
own harness such as ``tests/firmware/fw_harness.py`` and ``mp_fleet.py``), never by
importing one another: a test module imported by another runs its module-level code twice
and couples two files that pytest-xdist schedules apart. The one exception is
``tests/shared``: its modules are the test bodies both interpreters run, and the CPython
side runs them by importing them (``tests/core/test_shared_on_cpython.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def imported_test_modules(source: str) -> list[str]:
    """Names of ``test_*`` modules that ``source`` imports (top level or in a function)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return [n for n in names if n.split(".")[-1].startswith("test_")]


def test_no_test_module_imports_another() -> None:
    found = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        hits = [m for m in imported_test_modules(path.read_text())
                if not m.startswith("shared.")]
        if hits:
            found[str(path.relative_to(TESTS))] = hits
    assert not found, "move the shared helpers to a helper module: %s" % found


def test_the_check_sees_both_import_forms() -> None:
    assert imported_test_modules("import test_x\n") == ["test_x"]
    assert imported_test_modules("def f():\n    from test_y import g\n") == ["test_y"]
    assert imported_test_modules("from support import fleet\nimport json\n") == []
