"""The update installer (``ota_install``): side-by-side releases, the atomic switch, the
trial's commit and rollback, anti-rollback by sequence, the boot guard's crash-loop
limit, and a power cut at every write of the install path (each named step raising
before it happens; then a fresh installer recovers, as the next boot does).

Artifacts come from a real HTTPS server on loopback (``support.artifact_server``); the
release builder is the tests' fast one, and production's venv builder is tested once.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_download import DownloadRefused
from cityedge_gateway.ota_install import (
    Installer,
    InstallFailed,
    ReleaseRefused,
    build_venv,
    unpack,
)
from cityedge_gateway.ota_release import VerifiedRelease

from support.artifact_server import ArtifactServer
from support.mosquitto import TestPKI
from support.releases import artifact, copy_build, factory_image, release_of


class PowerCut(BaseException):
    """The power went at this step."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "opt-cityedge"
    r.mkdir()
    factory_image(r, "1.0.0", 1, tmp_path / "starts.log")
    return r


@pytest.fixture
def v2(pki: TestPKI, tmp_path: Path) -> Iterator[tuple[ArtifactServer, VerifiedRelease]]:
    body = artifact("2.0.0", tmp_path / "starts.log")
    with ArtifactServer(pki, body) as server:
        yield server, release_of(body, "2.0.0", 2, server.url)


def current(root: Path) -> str:
    return Path(os.readlink(root / "current")).name


def test_an_update_installs_beside_the_old_release_switches_and_commits(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    server, rel = v2
    inst = Installer(root, build=copy_build, trial_max_starts=3)
    assert inst.record().installed_sequence == 1  # the factory image's RELEASE
    rec = inst.update(rel, ca_file=pki.ca_pem)
    assert (rec.state, rec.version, rec.previous_version) == (s.TRIAL, "2.0.0", "1.0.0")
    assert current(root) == "2.0.0" and os.readlink(root / "previous") == "releases/1.0.0"
    assert (root / "releases/2.0.0/VERSION").read_text() == "2.0.0\n"
    assert (root / "releases/1.0.0/VERSION").read_text() == "1.0.0\n"  # untouched
    assert inst.boot_check().trial_starts == 1
    rec = inst.commit()
    assert (rec.state, rec.installed_version, rec.installed_sequence) == (s.COMMITTED,
                                                                          "2.0.0", 2)
    assert not (root / "downloads").exists()
    assert server.log == [None]


def test_a_trial_that_fails_rolls_back_and_says_why(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    _, rel = v2
    inst = Installer(root, build=copy_build)
    inst.update(rel, ca_file=pki.ca_pem)
    rec = inst.roll_back("no health within 30 s: the broker was never reached")
    assert (rec.state, rec.reason) == (s.ROLLED_BACK,
                                       "no health within 30 s: the broker was never reached")
    assert current(root) == "1.0.0"
    assert rec.installed_sequence == 1  # the floor stays where the committed release is


def test_an_older_or_equal_sequence_is_refused_before_anything_is_fetched(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    server, rel = v2
    inst = Installer(root, build=copy_build)
    inst.update(rel, ca_file=pki.ca_pem)
    inst.commit()
    server.log.clear()
    for seq, version in ((1, "1.0.0"), (2, "2.0.1"), (1, "9.0.0")):
        old = VerifiedRelease("gateway", version, seq, rel.size, rel.sha256, rel.url)
        with pytest.raises(ReleaseRefused, match="sequence"):
            inst.update(old, ca_file=pki.ca_pem)
    other = VerifiedRelease("fleet", "3.0.0", 3, rel.size, rel.sha256, rel.url)
    with pytest.raises(ReleaseRefused, match="fleet"):
        inst.update(other, ca_file=pki.ca_pem)
    assert server.log == []
    assert inst.record().state == s.COMMITTED and current(root) == "2.0.0"


def test_no_new_release_is_taken_while_one_is_in_trial(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    _, rel = v2
    inst = Installer(root, build=copy_build)
    inst.update(rel, ca_file=pki.ca_pem)
    newer = VerifiedRelease("gateway", "3.0.0", 3, rel.size, rel.sha256, rel.url)
    with pytest.raises(ReleaseRefused, match="trial"):
        inst.update(newer, ca_file=pki.ca_pem)


def test_the_boot_guard_rolls_back_a_release_that_never_commits(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    _, rel = v2
    inst = Installer(root, build=copy_build, trial_max_starts=2)
    inst.update(rel, ca_file=pki.ca_pem)
    assert [inst.boot_check().state for _ in range(2)] == [s.TRIAL, s.TRIAL]
    assert current(root) == "2.0.0"
    rec = inst.boot_check()  # the third start without a commit
    assert rec.state == s.ROLLED_BACK and "3 starts" not in rec.reason
    assert rec.reason == "2 starts in trial without a commit (limit 2)"
    assert current(root) == "1.0.0"
    assert inst.boot_check().state == s.ROLLED_BACK  # and stays so


def test_a_refused_download_records_failed_and_keeps_the_running_release(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    server, rel = v2
    server.mode = "endless-declared"
    inst = Installer(root, build=copy_build)
    with pytest.raises(DownloadRefused):
        inst.update(rel, ca_file=pki.ca_pem)
    rec = inst.record()
    assert rec.state == s.FAILED and "endless-data" in rec.reason
    assert current(root) == "1.0.0"
    server.mode = "normal"  # the server is fixed: the same release goes through
    assert inst.update(rel, ca_file=pki.ca_pem).state == s.TRIAL


def test_a_build_that_fails_records_failed_and_keeps_the_running_release(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    _, rel = v2

    def broken(unpacked: Path, target: Path) -> None:
        raise InstallFailed("pip could not install the release's wheels: no space left")

    with pytest.raises(InstallFailed):
        Installer(root, build=broken).update(rel, ca_file=pki.ca_pem)
    rec = Installer(root).record()
    assert rec.state == s.FAILED and "no space left" in rec.reason
    assert current(root) == "1.0.0" and not (root / "releases/2.0.0").exists()


def test_a_new_release_reusing_a_rolled_back_version_name_is_built_afresh(
        root: Path, pki: TestPKI, tmp_path: Path) -> None:
    """2.0.0 (seq 2) rolled back; a fixed 2.0.0 comes as seq 3: its own artifact is built,
    not the old directory reused."""
    inst = Installer(root, build=copy_build)
    bad = artifact("2.0.0", tmp_path / "starts.log", crash=True)
    with ArtifactServer(pki, bad) as server:
        inst.update(release_of(bad, "2.0.0", 2, server.url), ca_file=pki.ca_pem)
    inst.roll_back("no health")
    assert "exit 3" in (root / "releases/2.0.0/bin/cityedge").read_text()
    good = artifact("2.0.0", tmp_path / "starts.log")
    with ArtifactServer(pki, good) as server:
        rec = inst.update(release_of(good, "2.0.0", 3, server.url), ca_file=pki.ca_pem)
    assert (rec.state, rec.sequence, current(root)) == (s.TRIAL, 3, "2.0.0")
    assert "exit 3" not in (root / "releases/2.0.0/bin/cityedge").read_text()


def test_a_release_in_trial_whose_files_are_gone_is_rolled_back_at_the_next_start(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI) -> None:
    _, rel = v2
    inst = Installer(root, build=copy_build)
    inst.update(rel, ca_file=pki.ca_pem)
    (root / "releases/2.0.0/RELEASE").unlink()  # a damaged SD card, a careless hand
    rec = Installer(root).boot_check()
    assert rec.state == s.ROLLED_BACK and "missing or incomplete" in rec.reason
    assert current(root) == "1.0.0"


def _run_to_the_end(root: Path, rel: VerifiedRelease, ca: Path,
                    fault: Callable[[str], None] | None = None,
                    healthy: bool = True) -> None:
    """The whole update as the gateway and its boot guard do it, from any point: recover,
    install if not yet, count a start, then commit or roll back."""
    inst = Installer(root, build=copy_build, **({"fault": fault} if fault else {}))
    rec = inst.recover()
    done = rec.state in (s.COMMITTED, s.ROLLED_BACK) and rec.sequence == rel.sequence
    if rec.state != s.TRIAL and not done:
        inst.update(rel, ca_file=ca)
        rec = inst.record()
    if rec.state == s.TRIAL:
        inst.boot_check()
        if healthy:
            inst.commit()
        else:
            inst.roll_back("no health")


@pytest.mark.parametrize("healthy", [True, False], ids=["commit", "rollback"])
def test_a_power_cut_at_every_step_leaves_a_bootable_current_and_the_update_completes(
        root: Path, v2: tuple[ArtifactServer, VerifiedRelease], pki: TestPKI,
        tmp_path: Path, healthy: bool) -> None:
    _, rel = v2
    base = tmp_path / "pristine"
    os.rename(root, base)
    steps_seen: list[str] = []
    k = 0
    while True:
        subprocess.run(["rm", "-rf", str(root)], check=True)
        subprocess.run(["cp", "-a", str(base), str(root)], check=True)
        calls: list[str] = []

        def fault(step: str, calls: list[str] = calls, k: int = k) -> None:
            calls.append(step)
            if len(calls) == k + 1:
                raise PowerCut(step)

        try:
            _run_to_the_end(root, rel, pki.ca_pem, fault, healthy)
        except PowerCut:
            pass
        else:
            break  # no step left to cut
        steps_seen.append(calls[-1])
        # the next boot: recovery finds a release that boots, and never new code unjudged
        inst = Installer(root, build=copy_build)
        rec = inst.recover()
        assert inst.is_bootable(current(root)), (calls[-1], rec)
        if current(root) == "2.0.0":
            assert rec.state in (s.TRIAL, s.COMMITTED), (calls[-1], rec)
        else:
            assert current(root) == "1.0.0"
        _run_to_the_end(root, rel, pki.ca_pem, healthy=healthy)
        rec = Installer(root).record()
        if healthy:
            assert (rec.state, current(root), rec.installed_sequence) == (s.COMMITTED,
                                                                          "2.0.0", 2)
        else:
            assert (rec.state, current(root)) == (s.ROLLED_BACK, "1.0.0")
        k += 1
    assert {"state:installing", "unpack", "build", "marker", "rename-release",
            "link:previous", "state:trial", "link:current", "state:count-start"} <= set(
        steps_seen)
    assert ("state:commit" if healthy else "state:rolled-back") in steps_seen
    assert len(steps_seen) == k >= 12


def _wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, made by hand: ``ota_probe`` 1.0."""
    path = directory / "ota_probe-1.0-py3-none-any.whl"
    files = {"ota_probe/__init__.py": "VALUE = 'installed offline'\n",
             "ota_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: ota-probe\n"
                                                 "Version: 1.0\n",
             "ota_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                              "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join("%s,,\n" % name for name in files) + "ota_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("ota_probe-1.0.dist-info/RECORD", record)
    return path


def test_the_production_builder_makes_a_venv_from_the_artifacts_wheels(tmp_path: Path) -> None:
    """``build_venv`` as production runs it: ``python -m venv`` and pip, no index."""
    src = tmp_path / "src" / "wheels"
    src.mkdir(parents=True)
    _wheel(src)
    art = tmp_path / "artifact.tar.gz"
    with tarfile.open(art, "w:gz") as tar:
        tar.add(src, "wheels")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    unpack(art, unpacked)
    target = tmp_path / "releases" / "2.0.0"
    build_venv(unpacked, target)
    out = subprocess.run([str(target / "bin" / "python"), "-c",
                          "import ota_probe, sys; print(ota_probe.VALUE, sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["installed", "offline"] and Path(out[2]) == target
    empty = tmp_path / "empty"
    (empty / "wheels").mkdir(parents=True)
    with pytest.raises(InstallFailed, match="no wheels"):
        build_venv(empty, tmp_path / "releases" / "3.0.0")


@pytest.mark.parametrize("kind", ["symlink", "outside", "device"])
def test_an_artifact_with_links_or_paths_outside_is_not_unpacked(
        tmp_path: Path, kind: str) -> None:
    art = tmp_path / "a.tar.gz"
    with tarfile.open(art, "w:gz") as tar:
        if kind == "symlink":
            info = tarfile.TarInfo("bin/python")
            info.type, info.linkname = tarfile.SYMTYPE, "/usr/bin/python3"
            tar.addfile(info)
        elif kind == "outside":
            info = tarfile.TarInfo("../../etc/cron.d/x")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        else:
            info = tarfile.TarInfo("dev/sda")
            info.type = tarfile.BLKTYPE
            tar.addfile(info)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(InstallFailed):
        unpack(art, into)
    assert not (tmp_path / "etc").exists()
    assert sys.executable  # the interpreter the tests run; nothing else was touched


def test_the_update_section_is_checked(tmp_path: Path) -> None:
    from cityedge_gateway.config import ConfigError, parse_config

    key = tmp_path / "gw.key"
    key.write_text("x")
    base = {"gateway": {"device": "urn:dev:mac:b827ebfffe123456", "key_file": str(key)},
            "store": {"path": str(tmp_path / "b.sqlite")}}
    cfg = parse_config({**base, "update": {"root": str(tmp_path), "trial_deadline_s": 60}},
                       tmp_path, tmp_path / "g.toml")
    assert cfg.update is not None
    assert (cfg.update.root, cfg.update.trial_deadline_s, cfg.update.trial_max_starts) == (
        tmp_path, 60.0, 3)
    assert parse_config(base, tmp_path, tmp_path / "g.toml").update is None
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "update": {"root": str(tmp_path / "nope"), "trial_deadline_s": 1,
                                         "trial_max_starts": 0, "roots": "x"}},
                     tmp_path, tmp_path / "g.toml")
    text = "\n".join(e.value.problems)
    assert "update.root: directory" in text and "create it" in text
    assert "update.trial_deadline_s: 1 is out of range" in text
    assert "update.trial_max_starts: 0 is out of range" in text
    assert "update.roots: unknown key" in text


def test_the_update_commands_settings_are_checked(tmp_path: Path) -> None:
    """``release_roots`` (must exist), ``hw_class`` (needed with it, refused without it),
    ``ca_file``, ``build`` ("venv" or "copy")."""
    from cityedge_gateway.config import ConfigError, parse_config

    key = tmp_path / "gw.key"
    key.write_text("x")
    roots = tmp_path / "roots.json"
    roots.write_text("{}")
    base = {"gateway": {"device": "urn:dev:mac:b827ebfffe123456", "key_file": str(key)},
            "store": {"path": str(tmp_path / "b.sqlite")}}
    cfg = parse_config({**base, "update": {"root": str(tmp_path), "release_roots": "roots.json",
                                           "hw_class": "rpi4", "build": "copy"}},
                       tmp_path, tmp_path / "g.toml")
    assert cfg.update is not None
    assert (cfg.update.release_roots, cfg.update.hw_class, cfg.update.ca_file,
            cfg.update.build) == (roots, "rpi4", None, "copy")
    cfg = parse_config({**base, "update": {"root": str(tmp_path)}}, tmp_path, tmp_path / "g.toml")
    assert cfg.update is not None and (cfg.update.release_roots, cfg.update.build) == (
        None, "venv")
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "update": {"root": str(tmp_path), "release_roots": "gone.json",
                                         "build": "rsync", "ca_file": "nope.pem"}},
                     tmp_path, tmp_path / "g.toml")
    text = "\n".join(e.value.problems)
    assert "update.release_roots: file" in text and "does not exist" in text
    assert "update.hw_class: missing" in text
    assert "update.build: 'rsync' is not a way to build a release" in text
    assert "update.ca_file: file" in text
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "update": {"root": str(tmp_path), "hw_class": "rpi4"}},
                     tmp_path, tmp_path / "g.toml")
    assert "update.hw_class: applies with release_roots" in "\n".join(e.value.problems)


def test_build_copy_lays_down_a_release_that_has_its_program(tmp_path: Path) -> None:
    from cityedge_gateway.ota_install import InstallFailed, build_copy

    tree = tmp_path / "unpacked"
    (tree / "bin").mkdir(parents=True)
    with pytest.raises(InstallFailed):
        build_copy(tree, tmp_path / "r1")
    assert not (tmp_path / "r1").exists()
    (tree / "bin" / "cityedge").write_text("#!/bin/sh\n")
    build_copy(tree, tmp_path / "r2")
    assert (tmp_path / "r2" / "bin" / "cityedge").is_file()


def test_the_downloads_retry_settings_are_checked_and_reach_its_limits(
        tmp_path: Path) -> None:
    """``download_deadline_s``, ``download_attempts``, ``download_backoff_max_s``: defaults,
    ranges, and the ``DownloadLimits`` the ``update`` command downloads with."""
    from cityedge_gateway import limits
    from cityedge_gateway.config import ConfigError, parse_config
    from cityedge_gateway.ota_command import download_limits

    key = tmp_path / "gw.key"
    key.write_text("x")
    base = {"gateway": {"device": "urn:dev:mac:b827ebfffe123456", "key_file": str(key)},
            "store": {"path": str(tmp_path / "b.sqlite")}}
    cfg = parse_config({**base, "update": {"root": str(tmp_path)}}, tmp_path,
                       tmp_path / "g.toml")
    assert cfg.update is not None
    b = download_limits(cfg.update)
    assert (b.deadline_s, b.attempts_max, b.retry_max_s) == (
        limits.OTA_DOWNLOAD_DEADLINE_S, limits.OTA_DOWNLOAD_ATTEMPTS_DEFAULT,
        limits.OTA_RETRY_MAX_DEFAULT_S)
    cfg = parse_config({**base, "update": {
        "root": str(tmp_path), "download_deadline_s": 600, "download_attempts": 3,
        "download_backoff_max_s": 10}}, tmp_path, tmp_path / "g.toml")
    assert cfg.update is not None
    b = download_limits(cfg.update)
    assert (b.deadline_s, b.attempts_max, b.retry_max_s) == (600.0, 3, 10.0)
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "update": {
            "root": str(tmp_path), "download_deadline_s": 5, "download_attempts": 0,
            "download_backoff_max_s": 1e6}}, tmp_path, tmp_path / "g.toml")
    text = "\n".join(e.value.problems)
    assert "update.download_deadline_s: 5 is out of range" in text
    assert "update.download_attempts: 0 is out of range" in text
    assert "update.download_backoff_max_s: 1000000.0 is out of range" in text
