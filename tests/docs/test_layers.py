"""The layers of ``docs/ARCHITECTURE.md`` as a test: each package imports only the layers
below it, and no cycle between the modules of one package lacks a reason.

==========  ==============================================================  =============
layer       packages                                                        may import
==========  ==============================================================  =============
1 core      ``cityedge_core`` (MicroPython and CPython)                     nothing of ours
2 host      ``cityedge_host`` (CPython)                                     the core
3 parts     ``cityedge_fw`` (device), ``cityedge_gateway``, ``cityedge_fleet``,   core, host
            ``cityedge_provision``, ``cityedge_hardware``
4 app       ``cityedge`` (the command, demos, simulator, firmware build)    everything
==========  ==============================================================  =============

The device firmware runs on MicroPython: it imports the core only. Parts do not import
each other, with one named exception (``SHARED``): the fleet judges the hardware reports
vendors upload by the city's guideline catalogue and the checker's one "profile met" rule,
so it imports those two modules of ``cityedge_hardware`` (which import nothing of the
fleet). Inside a package a module may import one that imports it back only through a
lazy import (inside a function) with a comment on that line or the line before saying why.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {  # package -> (directory holding it, layer)
    "cityedge_core": ("firmware", 1),
    "cityedge_host": ("host", 2),
    "cityedge_fw": ("firmware", 3),
    "cityedge_gateway": ("gateway", 3),
    "cityedge_fleet": ("fleet", 3),
    "cityedge_provision": ("provisioning", 3),
    "cityedge_hardware": ("hardware", 3),
    "cityedge": (".", 4),
}
ONLY = {"cityedge_fw": {"cityedge_core"}}  # runs on MicroPython: no CPython library of ours
# part -> modules of another part it may import (module docstring: one home per rule)
SHARED = {"cityedge_fleet": ("cityedge_hardware.catalogue", "cityedge_hardware.report")}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (as far as it names one of ours)
    line: int
    lazy: bool  # inside a function
    explained: bool  # a comment on its line or the line before


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _imports() -> tuple[Import, ...]:
    """The scan, run in a fresh interpreter of its own.

    CPython 3.11's ``ast`` keeps its recursion counter per interpreter, not per thread: a
    thread left behind by another test in the same worker that builds AST objects at the
    same moment makes ``ast.parse`` raise "AST constructor recursion depth mismatch"
    (CPython issue 106905). A process with one thread cannot meet that."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    return tuple(Import(**row) for row in json.loads(out))


def _scan() -> list[Import]:
    found: list[Import] = []
    for package, (directory, _layer) in PACKAGES.items():
        base = ROOT / directory
        for path in sorted((base / package).rglob("*.py")):
            module = _module_name(path, base)
            source = path.read_text()
            lines = source.splitlines()
            tree = ast.parse(source)
            # lazy: inside a function, or deferred inside a module-level try/if (the
            # core's CPython-only re-exports); TYPE_CHECKING imports are not imports at run
            # time at all
            lazy_lines = {n.lineno for fn in ast.walk(tree)
                          if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Try
                                        | ast.If)
                          for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)}
            typing_only = {n.lineno for block in ast.walk(tree)
                           if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(
                               block.test)
                           for n in ast.walk(block) if isinstance(n, ast.Import | ast.ImportFrom)}
            for node in ast.walk(tree):
                if getattr(node, "lineno", None) in typing_only:
                    continue
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        here = module.split(".")
                        if path.name != "__init__.py":
                            here = here[:-1]
                        here = here[:len(here) - node.level + 1]
                        prefix = ".".join(here + ([node.module] if node.module else []))
                    else:
                        prefix = node.module or ""
                    # "from pkg import mod" names a module when pkg/mod.py exists
                    targets = [prefix + "." + a.name for a in node.names] + [prefix]
                else:
                    continue
                # a comment on the import, or on the lines of imports and comments
                # right above it (one comment may explain a block of imports)
                explained = "#" in lines[node.lineno - 1]
                row = node.lineno - 2
                while not explained and row >= 0:
                    text = lines[row].strip()
                    if not text.startswith(("#", "from ", "import ", "except ", "else:")):
                        break
                    explained = "#" in text
                    row -= 1
                for target in targets:
                    if target.split(".")[0] in PACKAGES:
                        found.append(Import(module, target, node.lineno,
                                            node.lineno in lazy_lines, explained))
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for imp in _imports():
        src, dst = _package(imp.source), _package(imp.target)
        if src == dst:
            continue
        src_layer, dst_layer = PACKAGES[src][1], PACKAGES[dst][1]
        allowed = (dst_layer < src_layer and dst in ONLY.get(src, {dst})) or any(
            imp.target == m or imp.target.startswith(m + ".") for m in SHARED.get(src, ()))
        if not allowed:
            wrong.append("%s:%d imports %s" % (imp.source, imp.line, imp.target))
    assert not wrong, "\n".join(wrong)


def _modules_of(package: str) -> set[str]:
    directory = ROOT / PACKAGES[package][0]
    return {_module_name(p, directory) for p in (directory / package).rglob("*.py")}


def test_no_unexplained_import_cycle_inside_a_package() -> None:
    imports = _imports()
    problems = []
    for package in PACKAGES:
        modules = _modules_of(package)
        edges: dict[str, list[Import]] = {}
        for imp in imports:
            if imp.source in modules and imp.target in modules and imp.target != imp.source:
                edges.setdefault(imp.source, []).append(imp)
        # every cycle must pass through an explained lazy import: drop those edges and
        # look for a cycle in what is left
        strict = {m: {i.target for i in es if not (i.lazy and i.explained)}
                  for m, es in edges.items()}
        cycle = _find_cycle(strict)
        if cycle:
            problems.append(" -> ".join(cycle))
    assert not problems, "import cycles without an explained lazy import:\n" + \
        "\n".join(problems)


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return []


def test_the_rule_catches_what_it_should() -> None:
    """The checker itself: a cycle is found, a layer break would be seen."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) == []
    assert any(i.source.startswith("cityedge.") and _package(i.target) == "cityedge_fleet"
               for i in _imports())  # the app imports the parts (so the scan sees imports)


if __name__ == "__main__":
    print(json.dumps([asdict(i) for i in _scan()]))
