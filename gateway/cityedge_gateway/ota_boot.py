"""The boot guard: what systemd runs before every start of the gateway.

``python -m cityedge_gateway.ota_boot /opt/cityedge`` (the unit's ``ExecStartPre``, run
with the interpreter of ``previous``: the release that was healthy and installed the one in
trial). It finishes any switch a power cut interrupted (``Installer.recover``) and, while a
release is in trial, counts the start; past ``trial_max_starts`` starts without a commit it
rolls ``current`` back, so a release that crashes before it can judge its own health (an
import error, a crash at start) is undone all the same. Then systemd starts ``current``.

It prints one line saying what it found (the journal keeps it) and exits 0 whatever
happened: a guard that fails must not keep the gateway from starting.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .ota_install import Installer


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cityedge_gateway.ota_boot UPDATE_ROOT", file=sys.stderr)
        return 2
    try:
        rec = Installer(Path(args[0])).boot_check()
    except Exception as e:  # reported, never fatal: the gateway must still start
        print("cityedge boot guard: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 0
    print("cityedge boot guard: update %s %s (seq %d), start %d of %d%s"
          % (rec.state, rec.version, rec.sequence, rec.trial_starts, rec.trial_max_starts,
             "; " + rec.reason if rec.reason else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
