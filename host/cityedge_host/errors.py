"""The command line's one error family: a problem the person at the keyboard can fix.

``UserError(message, hint)`` is what every part raises for a bad file, a refused request,
an unreachable service, a wrong setting: the ``cityedge`` command prints it once, at the
top (``cityedge.cli``), as::

    cityedge: <what went wrong>
      what to do: <hint>

and exits 1 — never with a traceback (the pattern of mpremote's ``CommandError``). A part
subclasses it where the kind of fault matters to its callers (provisioning's
``DeviceRefused`` and ``LinkError``, the gateway's ``ConfigError``) and gives the subclass
a default ``hint``. Exit codes of ``cityedge``: 0 done; 1 a ``UserError`` (or another
failure reported in one line: a refused input, an unreachable service); 2 a usage error (an
unknown option, a missing argument: Click's); 3 nothing to work on: the database (or other
store) named in the settings is missing, empty where rows are expected, not the project's
or unreachable — a subclass says so with ``exit_code`` (so ``audit verify`` tells "the log
is broken", 1, from "there was no log to check", 3); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """``str(e)``: what went wrong; ``e.hint``: what to do next ("" when nothing to add)."""

    hint = ""
    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint
