"""``ast.parse`` for tests that read our sources while other tests' threads run.

CPython 3.11 keeps the AST builder's recursion counter per interpreter, not per thread
(CPython issue 106905): when a thread left behind by another test in the same xdist worker
builds AST objects at the same moment, ``ast.parse`` raises ``SystemError: AST constructor
recursion depth mismatch`` although the source is fine. The counter is reset at the start
of every call, so parsing again is exact; any other error is raised as it is.
"""

from __future__ import annotations

import ast

ATTEMPTS = 5


def parse(source: str) -> ast.Module:
    for attempt in range(ATTEMPTS):
        try:
            return ast.parse(source)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")
