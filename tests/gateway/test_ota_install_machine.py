"""The installer under random use (hypothesis state machine): releases offered in any order
(older, equal, newer, while busy), starts, healthy and unhealthy trials, and a power cut at
any step of any of them. After every step, as the next boot finds it: ``current`` is a
complete release, new code runs only in trial, the anti-rollback floor never goes down,
and a release is refused exactly when the rules say.

The download is replaced by a copy of the artifact (``ota_download`` has its own tests
against a real server); everything else is the installer as production runs it, on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cityedge_gateway import ota_install
from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_install import Installer, ReleaseRefused
from cityedge_gateway.ota_release import VerifiedRelease

from support.releases import artifact, copy_build, factory_image


class PowerCut(BaseException):
    pass


def _copy_download(release: VerifiedRelease, part: Path, **_kw: Any) -> Path:
    part.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(release.url.removeprefix("https://local")), part)
    return part


class InstallerUse(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ota-machine-"))
        self.root = self.dir / "root"
        self.root.mkdir()
        factory_image(self.root, "v1", 1, self.dir / "starts.log")
        self.floor = 1
        self.arts: dict[int, Path] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _installer(self, cut: int | None) -> Installer:
        calls = [0]

        def fault(step: str) -> None:
            calls[0] += 1
            if cut is not None and calls[0] == cut:
                raise PowerCut(step)

        return Installer(self.root, build=copy_build, trial_max_starts=2, fault=fault)

    def _release(self, seq: int) -> VerifiedRelease:
        if seq not in self.arts:
            p = self.dir / ("v%d.tar.gz" % seq)
            p.write_bytes(artifact("v%d" % seq, self.dir / "starts.log"))
            self.arts[seq] = p
        data = self.arts[seq].read_bytes()
        return VerifiedRelease("gateway", "v%d" % seq, seq, len(data),
                               hashlib.sha256(data).digest(), "https://local%s" % self.arts[seq])

    cuts = st.none() | st.integers(1, 12)

    @rule(seq=st.integers(1, 6), cut=cuts)
    def offer(self, seq: int, cut: int | None) -> None:
        before = Installer(self.root).recover()
        refused = (seq <= before.installed_sequence or before.state in s.BUSY
                   or "v%d" % seq == before.installed_version)
        try:
            rec = self._installer(cut).update(self._release(seq), ca_file=Path("/unused"))
        except ReleaseRefused:
            assert refused
            event("offer refused")
            return
        except PowerCut:
            assert not refused
            event("offer cut")
            return
        assert not refused
        assert rec.state == s.TRIAL and rec.sequence == seq
        event("offer installed")

    @rule(cut=cuts)
    def start(self, cut: int | None) -> None:
        with contextlib.suppress(PowerCut):
            self._installer(cut).boot_check()

    @rule(cut=cuts, healthy=st.booleans())
    def trial_outcome(self, cut: int | None, healthy: bool) -> None:
        inst = self._installer(cut)
        try:
            if inst.recover().state != s.TRIAL:
                return
            inst.commit() if healthy else inst.roll_back("no health")
            event("committed" if healthy else "rolled back")
        except PowerCut:
            event("outcome cut")

    @invariant()
    def the_next_boot_finds_a_release_that_runs(self) -> None:
        inst = Installer(self.root)
        rec = inst.recover()
        current = Path(os.readlink(self.root / "current")).name
        assert inst.is_bootable(current), rec
        if current != rec.installed_version:  # new code runs only while judged
            assert rec.state == s.TRIAL and current == rec.version, rec
        assert rec.installed_sequence >= self.floor
        self.floor = rec.installed_sequence
        assert not list(self.root.glob("*.tmp"))


TestInstallerUse = InstallerUse.TestCase
TestInstallerUse.settings = settings(max_examples=60, stateful_step_count=12)


@pytest.fixture(autouse=True)
def _local_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ota_install, "download", _copy_download)
