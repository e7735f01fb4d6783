"""The order the suite's files start in: longest first.

``make test`` hands whole files to its workers (``--dist loadfile``). pytest-xdist starts
them in the order the workers collected them (``--no-loadscope-reorder``; its default
orders files by their number of tests, which put a file of three 60-second tests last and
left one worker running it alone at the end). Starting the longest files first and the
short ones last (the classic longest-first rule) lets the short ones fill the gaps, so
the workers end together.

The seconds per file come from a measured run: ``tests/file_seconds.txt``, one
``<seconds> <file>`` line per file, written by ``python tests/support/file_order.py
JUNIT.xml`` from a run's ``--junitxml`` report. A file missing there (a new one) counts
as ``NEW_FILE_SECONDS``: started early, as a new file is often a long end-to-end one.
The order only moves whole files; the tests of a file keep their own order (and their
module-scoped fixtures). Every worker reads the same file, so all collect the same order,
as xdist requires.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

SECONDS_FILE = Path(__file__).resolve().parent.parent / "file_seconds.txt"
NEW_FILE_SECONDS = 30.0


class Item(Protocol):
    nodeid: str


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def read_seconds(path: Path = SECONDS_FILE) -> dict[str, float]:
    """``{file: seconds}`` from ``path`` (empty when it does not exist). A line that does
    not parse is an error naming the line: the file is the project's own."""
    if not path.exists():
        return {}
    out: dict[str, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        try:
            out[parts[1]] = float(parts[0])
        except (IndexError, ValueError):
            raise ValueError("%s:%d: expected '<seconds> <file>', got %r"
                             % (path, n, line)) from None
    return out


def longest_first(items: Sequence[Item], seconds: dict[str, float]) -> list[Item]:
    """``items`` grouped by file, the files in decreasing ``seconds`` (ties by name), each
    file's items in their collected order."""
    by_file: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_file[file_of(item.nodeid)].append(item)
    files = sorted(by_file, key=lambda f: (-seconds.get(f, NEW_FILE_SECONDS), f))
    return [item for f in files for item in by_file[f]]


def seconds_from_junit(report: Path) -> dict[str, float]:
    """Seconds per test file in a ``--junitxml`` report (the sum of its test cases')."""
    totals: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        classname = case.get("classname", "")
        # "tests.fleet.test_x" or "tests.fleet.test_x.TestClass"
        parts = classname.split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        if not parts:
            continue
        totals["/".join(parts) + ".py"] += float(case.get("time", "0") or 0)
    return dict(totals)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/support/file_order.py JUNIT.xml > tests/file_seconds.txt",
              file=sys.stderr)
        return 2
    totals = seconds_from_junit(Path(argv[0]))
    print("# seconds per test file, from one measured run (tests/support/file_order.py)")
    for name, secs in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])):
        print("%.1f %s" % (secs, name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
