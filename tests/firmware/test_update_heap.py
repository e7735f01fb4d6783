"""The update's boot steps in the 64 KiB heap the agent streams in, as a board boots them
(``bench.ota_device.boot_steps``: ``main.main`` on the stand-in board, code from the ROMFS
image, one process per boot): the fetch, the check and the download from a real HTTPS
artifact server with Range requests, and the check alone on files put on the flash.

The check is the update's peak, and whether it fits depends on where its objects land,
which moves with every interned or stored string: the compiled code's path (each
module's ``__file__``) and the device's file paths in its configuration. So the steps run
in directories of four path lengths (the keys' and certificates' random sizes move it
too). Before ``update_verify.verdict`` loaded ``cose_decode`` ahead of the key list's
verification, such runs failed at 64 KiB now and then: 4 of 12 at lengths 14-43 (the
fetch-check-download at 14, 31 and 37 characters, the check alone at 19), and 1 of this
test's 8 in one run (docs/ARCHITECTURE.md, "Device updates")."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.ota_device import QUICK_BYTES, boot_steps, compile_device

from support.artifact_server import ArtifactServer
from support.mosquitto import TestPKI

STEP_HEAP_KIB = 64  # the heap the agent streams in (tests/firmware/test_boot.py)
RANDOM_CHARS = 8  # what tempfile.mkdtemp adds to its prefix


def base_dir(length: int) -> Path:
    """A fresh directory whose path has ``length`` characters."""
    tmp = tempfile.gettempdir()
    prefix = "c" * (length - len(tmp) - 1 - RANDOM_CHARS)
    assert prefix, length
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    assert len(str(d)) == length, d
    return d


@pytest.mark.parametrize("length", [14, 19, 31, 37])
def test_the_update_boot_steps_complete_in_64_kib(length: int) -> None:
    base = base_dir(length)
    try:
        mpy = compile_device(base / "mpy")
        pki = TestPKI(base / "pki")
        with ArtifactServer(pki, os.urandom(QUICK_BYTES), files={}) as server:
            net = boot_steps(base, mpy, STEP_HEAP_KIB, server, pki)
        check = boot_steps(base, mpy, STEP_HEAP_KIB)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for r in (net, check):
        assert r["passed"], r["output"]
        assert "MemoryError" not in r["output"], r["output"]
        # the check reached its verdict: its heap figures were printed
        assert r["heap"] is not None and r["heap"][1] > r["heap"][0], r["output"]
    assert net["download"] is not None, net["output"]  # the download ran and reported
