"""Provisioning on the device is three modules with one job each (``docs/ARCHITECTURE.md``,
"Provisioning"), as a test of their imports:

==========================  ==================================  ==============================
module                      its job                             never reaches
==========================  ==================================  ==============================
``provision``               the step state machine              the MQTT client and link,
                                                                asyncio, the self-test, the
                                                                frame loop, the line adapters
``provision_serial``        the frame loop on a line            the MQTT client and link,
                                                                asyncio, the self-test
``provision_selftest``      the self-test on the agent's link   the frame loop, the line
                                                                adapters, the state machine
==========================  ==================================  ==============================

"Reaches" follows every import in the source (``ast``: at module level and inside
functions, where the firmware defers what it loads only when used) through the firmware's
own modules (``cityedge_fw``, ``cityedge_core``), so a forbidden module brought in by a
helper counts too. ``provision_main`` wires them (it gives the state machine its self-test).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from support import ast_source

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
OURS = ("cityedge_fw", "cityedge_core")

MQTT = {"cityedge_fw.mqtt", "cityedge_fw.mqtt_async", "asyncio", "uasyncio"}
SELF_TEST = {"cityedge_fw.provision_selftest"}
SERIAL = {"cityedge_fw.provision_serial", "cityedge_fw.provision_main", "select", "uselect"}
NEVER = {
    "cityedge_fw.provision": MQTT | SELF_TEST | SERIAL,
    "cityedge_fw.provision_serial": MQTT | SELF_TEST | {"cityedge_fw.provision_main"},
    "cityedge_fw.provision_selftest": SERIAL | {"cityedge_fw.provision"},
}


def _path(module: str) -> Path | None:
    base = FIRMWARE.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


@cache
def imports_of(module: str) -> frozenset[str]:
    """The modules ``module``'s source imports, anywhere in it, by absolute name."""
    path = _path(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast_source.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = base + "." + node.module if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            # "from pkg import name" imports the module pkg.name when there is one
            found.update(base + "." + alias.name for alias in node.names
                         if _path(base + "." + alias.name) is not None)
    return frozenset(found)


def reached_from(module: str) -> set[str]:
    """Every module ``module`` imports, directly or through the firmware's own modules."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in imports_of(todo.pop()):
            if target not in seen:
                seen.add(target)
                if target.split(".")[0] in OURS and _path(target) is not None:
                    todo.append(target)
    return seen


@pytest.mark.parametrize("module", list(NEVER))
def test_each_provisioning_module_keeps_to_its_job(module: str) -> None:
    wrong = sorted(reached_from(module) & NEVER[module])
    assert not wrong, "%s reaches %s" % (module, ", ".join(wrong))


def test_the_check_sees_what_the_modules_do_import() -> None:
    """The walk finds the imports the modules are known to have (the test above would pass
    vacuously if it found none): the self-test uses the agent's link and its client."""
    assert {"cityedge_fw.mqtt_async", "cityedge_fw.mqtt", "asyncio"} <= reached_from(
        "cityedge_fw.provision_selftest")
    assert "cityedge_fw.provision" in reached_from("cityedge_fw.provision_serial")
    assert {"cityedge_core.frame", "cityedge_core.csr", "cityedge_fw.keys"} <= reached_from(
        "cityedge_fw.provision")
    assert SELF_TEST | {"cityedge_fw.provision_serial"} <= reached_from(
        "cityedge_fw.provision_main")
