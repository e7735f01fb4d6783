"""Running ``cityedge provision`` in-process (Typer's runner) and comparing its output with
the expected-output files in ``expected/`` after masking what varies between runs."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner, Result

from cityedge.cli import app

EXPECTED = Path(__file__).parent / "expected"
MASKS = (
    (re.compile(r"\(\d+\.\d\d s\)"), "(T s)"),
    (re.compile(r"in \d+\.\d s"), "in T s"),
    (re.compile(r"kid [0-9a-f]{16}"), "kid KID"),
    (re.compile(r"/dev/pts/\d+"), "PORT"),
    (re.compile(r"\(\d+ bytes\)"), "(N bytes)"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:PORT"),
    (re.compile(r"batch \d+ acknowledged"), "batch N acknowledged"),
    (re.compile(r"certificates? [0-9a-f]{20,} revoked"), "certificate SERIAL revoked"),
    (re.compile(r"valid until \S+"), "valid until DATE"),
    # a temporary path: /tmp, or the RAM directory `make test` runs in (/dev/shm)
    (re.compile(r"(?:/tmp|/dev/shm)/\S+/(\S+)"), r"TMP/\1"),
    (re.compile(r"│ \d\.\d( +)│$", re.M), r"│ T.T\1│"),  # seconds in summary tables
)


def mask(text: str) -> str:
    for pattern, repl in MASKS:
        text = pattern.sub(repl, text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines()) + "\n"


def run_cli(args: list[str], home: Path, input: str | None = None) -> Result:
    runner = CliRunner()
    return runner.invoke(app, args, env={"CITYEDGE_HOME": str(home), "COLUMNS": "200"},
                         input=input, catch_exceptions=False)


def check_expected(name: str, text: str) -> None:
    """Compare masked ``text`` with ``expected/<name>.txt`` (written when missing)."""
    path = EXPECTED / (name + ".txt")
    got = mask(text)
    if not path.exists():
        path.write_text(got)
        raise AssertionError("wrote new expected output %s; check it and run again" % path)
    assert got == path.read_text(), "output differs from %s:\n%s" % (path, got)
