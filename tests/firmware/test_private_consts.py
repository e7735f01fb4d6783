"""A private ``_X = const(...)`` of the firmware is defined before its first use.

MicroPython's compiler folds a private const from its definition on: a use above it
compiles to a global lookup of a name that never exists on the device (``NameError`` at
run time), while CPython, where ``const`` is the identity, runs fine. The firmware's
on-demand paths (a command's check, a drop) run on the device only in a few tests, so
this checks every module's source."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
MODULES = sorted(FIRMWARE.rglob("*.py"))


def _code_names(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every identifier in the code (no comments, strings, docstrings)."""
    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(t.start[0], t.string) for t in toks if t.type == tokenize.NAME]


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(FIRMWARE)) for p in MODULES])
def test_every_private_const_is_defined_before_it_is_used(path: Path) -> None:
    lines = path.read_text().split("\n")
    defined = {m.group(1): i + 1 for i, line in enumerate(lines)
               if (m := re.match(r"(_[A-Z0-9_]+) = const\(", line))}
    early = [(name, line, defined[name]) for line, name in _code_names(path)
             if name in defined and line < defined[name]]
    assert not early, early
