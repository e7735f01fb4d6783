"""``cityedge --help`` and ``--version`` answer without importing the parts: no FastAPI,
SQLAlchemy, SQLModel, cryptography, uvicorn or paho (checked in ``sys.modules`` of a fresh
interpreter, not by timing), while every part still runs when named."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

from cityedge import cli

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("fastapi", "sqlalchemy", "sqlmodel", "cryptography", "uvicorn", "paho", "alembic",
         "pydantic", "rich", "serial", "cbor2", "jinja2", "yaml")
PROBE = """
import json, sys
sys.argv = ["cityedge", *json.loads(sys.argv[1])]
from cityedge.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def run_probe(args: list[str]) -> tuple[int, set[str], str]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ))
    got = json.loads(done.stderr.strip().splitlines()[-1])
    top = {name.split(".")[0] for name in got["modules"]}
    return got["code"], top, done.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], [], ["fleet", "--version"]])
def test_the_bare_command_imports_none_of_the_heavy_libraries(args: list[str]) -> None:
    code, top, out = run_probe(args)
    assert code in (0, 2, None), out  # no_args_is_help: bare `cityedge` is a usage answer
    assert sorted(top & set(HEAVY)) == []
    assert not any(name.startswith("cityedge_fleet") or name.startswith("cityedge_gateway")
                   for name in top)


def test_help_lists_every_part_with_its_own_help_line() -> None:
    code, _top, out = run_probe(["--help"])
    assert code == 0
    for name in cli.PARTS:
        assert "  %s " % name in out


@pytest.mark.parametrize("name", sorted(cli.PARTS))
def test_the_listing_says_what_the_part_itself_says(name: str) -> None:
    """``PARTS`` repeats each group's help so the listing needs no import: kept equal."""
    module, attribute, help_text = cli.PARTS[name]
    obj = getattr(__import__(module, fromlist=[attribute]), attribute)
    own = obj.info.help if isinstance(obj, typer.Typer) else inspect.getdoc(obj)
    assert own is not None
    assert help_text == inspect.cleandoc(own).split("\n\n")[0].replace("\n", " ")


def test_version_is_the_distributions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    code, _top, out = run_probe(["--version"])
    assert code in (0, None) and out.strip() == "cityedge %s" % project["version"]
    code, _top, out = run_probe(["fleet", "--version"])
    assert out.strip() == "cityedge fleet %s" % project["version"]


def test_a_part_named_is_imported_and_runs() -> None:
    code, _top, out = run_probe(["fleet", "--help"])
    assert code == 0 and "init-db" in out and "serve" in out
    code, _top, out = run_probe(["hw", "--help"])
    assert code == 0 and "upload" in out  # added by the fleet side when `hw` loads


def test_the_shell_completes_parts_and_their_commands() -> None:
    """``--show-completion`` gives the shell's script; the shell's question (the words
    typed so far) is answered with the parts, then a part's own commands (imported for
    it)."""
    cityedge = Path(sys.executable).parent / "cityedge"
    shown = subprocess.run([str(cityedge), "--show-completion", "bash"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "_cityedge_completion" in shown.stdout

    def complete(words: str) -> list[str]:
        env = dict(os.environ, _CITYEDGE_COMPLETE="complete_bash", COMP_WORDS=words,
                   COMP_CWORD=str(len(words.split()) - 1))
        r = subprocess.run([str(cityedge)], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("cityedge fl") == ["fleet"]
    assert set(complete("cityedge fleet in")) == {"init-db", "ingest"}
    assert "upload" in complete("cityedge hw u")
