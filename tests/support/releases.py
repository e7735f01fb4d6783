"""Gateway releases for the update tests: artifacts, a fast release builder, a factory
image.

A test release is what production's is in miniature: ``bin/cityedge`` and ``bin/python``
(here small scripts that run this test environment's interpreter, so a release is built in
milliseconds instead of a venv's seconds) and ``VERSION``. Each start of a release appends
``<version> <pid>`` to a starts log, so a test sees which release systemd started, in
order. A ``crash`` release exits with 3 at once, as a release that cannot import would.
``copy_build`` is the ``ReleaseBuilder`` that lays the unpacked tree down as the release.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

from cityedge_gateway.ota_release import VerifiedRelease

GOOD = """#!/bin/sh
echo "%(version)s $$" >> "%(starts)s"
exec "%(python)s" -m cityedge.cli "$@"
"""
CRASH = """#!/bin/sh
echo "%(version)s crash" >> "%(starts)s"
exit 3
"""
PYTHON = """#!/bin/sh
exec "%(python)s" "$@"
"""


def artifact(version: str, starts: Path, crash: bool = False) -> bytes:
    """A release artifact (tar.gz) for ``version``."""
    values = {"version": version, "starts": starts, "python": sys.executable}
    files = {"bin/cityedge": ((CRASH if crash else GOOD) % values, 0o755),
             "bin/python": (PYTHON % values, 0o755),
             "VERSION": (version + "\n", 0o644)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def release_of(body: bytes, version: str, sequence: int, url: str) -> VerifiedRelease:
    return VerifiedRelease("gateway", version, sequence, len(body),
                           hashlib.sha256(body).digest(), url)


def copy_build(unpacked: Path, target: Path) -> None:
    """The tests' ``ReleaseBuilder``: the unpacked tree is the release."""
    shutil.copytree(unpacked, target)


def factory_image(root: Path, version: str, sequence: int, starts: Path) -> None:
    """``root`` as a Pi leaves the factory: one release, ``current`` at it, no record."""
    d = root / "releases" / version
    d.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(artifact(version, starts)), mode="r:gz") as tar:
        tar.extractall(d, filter="data")
    (d / "RELEASE").write_text(json.dumps({"version": version, "sequence": sequence}))
    os.symlink("releases/" + version, root / "current")
