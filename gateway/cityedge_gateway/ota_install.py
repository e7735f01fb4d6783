"""Installing a release side by side, switching to it atomically, committing or rolling back.

Layout under the update root (``/opt/cityedge`` on a Pi)::

    releases/<version>/   one complete release each: a venv with the gateway installed,
                          and RELEASE (JSON: version, sequence, sha256) written last
    current -> releases/<version>      what systemd starts (ExecStart goes through it)
    previous -> releases/<version>     what a trial rolls back to; runs the boot guard
    state.json            the ``UpdateRecord`` (``ota_state``)
    downloads/<sequence>.part[.progress]   the artifact being fetched (``ota_download``)

Order of writes, so that a power cut at any of them leaves a ``current`` that boots:

1. the record moves first (``write_atomic``: temp file, fsync, rename, directory fsync);
   the symlinks are then made to agree with it. ``recover()`` (every start, and the boot
   guard) redoes that agreement, so a cut between the two is finished at the next start;
2. a release is built in ``releases/<version>.tmp`` and renamed to its name only when
   complete (RELEASE inside), so a half-built one never carries a release's name;
3. a symlink is switched by making a new one under a temporary name and renaming it over
   the old (``os.replace``: atomic), then fsyncing the directory;
4. the trial record (naming the new release and the previous one) is written before
   ``current`` moves, and ``rolled-back`` before it moves back: a start in between
   finds the record ahead and completes the switch.

A cut while ``installing`` (before the trial record) fails that attempt (``failed``,
"interrupted") and leaves the old ``current``; the same release may be installed again.
A release in trial whose directory is gone or incomplete is rolled back by ``recover()``.
A version directory is reused only when its RELEASE names the same artifact digest.

Anti-rollback: ``installed_sequence`` is the sequence of the release last committed,
persisted in the record; a release whose sequence is not above it is refused
(``ReleaseRefused``), also when its files are still on disk. A sanctioned return to old
content is a new release of it with a higher sequence. The release-key list is kept from
going back the same way (as the device keeps ``keys`` in its boot pointer): the record
holds the list version each release was verified under (``keys_version``) and, from its
commit, ``installed_keys_version`` beside the installed sequence, in the same atomic write.
``ota_command`` hands that floor to ``check_update``, which refuses an older list
(``keys_rollback``: a list that still certifies a release key the root holders have since
revoked); ``check`` here refuses such a release again. A rollback leaves the floor where it
was; RELEASE carries the version too, so a factory image without a record has its floor.

The trial: after the switch the process exits (``EXIT_RESTART``) and systemd starts
``current``. Before each start the boot guard (``ota_boot``, run by systemd from
``previous``: code that was healthy) counts the start; more than ``trial_max_starts``
starts without a commit roll back (a release that cannot even import is caught here). The
started gateway must prove its health within its deadline (``ota_health``) and then calls
``commit()``; otherwise it calls ``roll_back(reason)`` and exits non-zero, and systemd
starts the previous release.

Building a release is pluggable (``ReleaseBuilder``): ``build_venv`` is production's
(``python -m venv`` + ``pip install --no-index`` from the artifact's ``wheels/``);
``build_copy`` lays down an artifact that is a whole release already (``[update] build``);
tests use a faster one and test this one once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

from . import limits
from .ota_download import (
    DownloadInterrupted,
    DownloadLimits,
    DownloadRefused,
    Observer,
    download,
)
from .ota_release import COMPONENT, VerifiedRelease
from .ota_state import (
    BUSY,
    COMMITTED,
    DOWNLOAD,
    DOWNLOAD_DONE,
    DOWNLOADED,
    DOWNLOADING,
    FAIL,
    HEALTHY,
    INSTALL,
    INSTALLING,
    ROLLED_BACK,
    SCHEDULE,
    SWITCH,
    TRIAL,
    UNHEALTHY,
    UpdateRecord,
    UpdateStateError,
)

log = logging.getLogger(__name__)

STATE = "state.json"
RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"
DOWNLOADS = "downloads"
MARKER = "RELEASE"
EXIT_RESTART = 75  # the gateway exits with this to be started again in the new release
EXIT_ROLLED_BACK = 76  # ... and with this after rolling back (systemd restarts the old one)

# (unpacked artifact directory, the new release's directory) -> None; raises on failure
ReleaseBuilder = Callable[[Path, Path], None]


class ReleaseRefused(UserError):
    """The release may not be installed here (older, another component, or busy)."""

    hint = "only a release with a higher sequence than the installed one is taken"


class InstallFailed(UserError):
    """The release could not be installed; the running release is unchanged."""


def _no_fault(step: str) -> None:
    """Failure points: tests inject a power cut at each named step."""


def build_venv(unpacked: Path, target: Path) -> None:
    """A venv at ``target`` with every wheel of ``unpacked/wheels`` installed, offline."""
    wheels = sorted((unpacked / "wheels").glob("*.whl"))
    if not wheels:
        raise InstallFailed("the artifact has no wheels/*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)],
                   check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install",
         "--no-index", "--find-links", str(unpacked / "wheels"), "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", *map(str, wheels)],
        capture_output=True, text=True)
    if result.returncode:
        raise InstallFailed("pip could not install the release's wheels: %s"
                            % result.stderr.strip()[-500:])


def build_copy(unpacked: Path, target: Path) -> None:
    """The artifact's tree is the release as it is (``[update] build = "copy"``: a release
    built for the Pi elsewhere, with its ``bin/cityedge``); it must hold that program."""
    if not (unpacked / "bin" / "cityedge").is_file():
        raise InstallFailed("the artifact has no bin/cityedge to start")
    shutil.copytree(unpacked, target, symlinks=True)


def unpack(artifact: Path, into: Path) -> None:
    """Unpack a tar.gz artifact: regular files and directories only, bounded in count
    and size, nothing outside ``into`` (tarfile's ``data`` filter)."""
    try:
        with tarfile.open(artifact, "r:gz") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for m in tar:
                if len(members) >= limits.OTA_UNPACK_MAX_FILES:
                    raise InstallFailed("the artifact has more than %d files"
                                        % limits.OTA_UNPACK_MAX_FILES)
                if not (m.isfile() or m.isdir()):
                    raise InstallFailed("the artifact holds %s, not a file or directory"
                                        % m.name[:100])
                total += m.size
                if total > limits.OTA_UNPACK_MAX_BYTES:
                    raise InstallFailed("the artifact unpacks to more than %d bytes"
                                        % limits.OTA_UNPACK_MAX_BYTES)
                members.append(m)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InstallFailed("the artifact cannot be unpacked: %s" % e) from e


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Installer:
    """The update root of one gateway (see the module's docstring)."""

    def __init__(self, root: Path, *, build: ReleaseBuilder = build_venv,
                 trial_max_starts: int = limits.OTA_TRIAL_MAX_STARTS_DEFAULT,
                 fault: Callable[[str], None] = _no_fault) -> None:
        self.root = root
        self.build = build
        self.trial_max_starts = trial_max_starts
        self.fault = fault

    # -- paths and links

    @property
    def releases(self) -> Path:
        return self.root / RELEASES

    def release_dir(self, version: str) -> Path:
        return self.releases / version

    def link(self, name: str) -> str:
        """The version ``name`` (current / previous) points at, "" if none."""
        try:
            target = os.readlink(self.root / name)
        except OSError:
            return ""
        return Path(target).name

    def is_bootable(self, version: str) -> bool:
        return bool(version) and (self.release_dir(version) / MARKER).is_file()

    def _point(self, name: str, version: str) -> None:
        """``name`` -> releases/<version>, atomically (a new link renamed over the old)."""
        if self.link(name) == version:
            return
        self.fault("link:%s" % name)
        tmp = self.root / (name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.join(RELEASES, version), tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    # -- the record

    def record(self) -> UpdateRecord:
        """The persisted record; without one, the release ``current`` holds is committed
        (a factory image) and its RELEASE file gives the anti-rollback floor."""
        try:
            data = (self.root / STATE).read_bytes()
        except FileNotFoundError:
            version = self.link(CURRENT)
            if not self.is_bootable(version):
                return UpdateRecord()
            marker = json.loads((self.release_dir(version) / MARKER).read_bytes())
            seq = int(marker.get("sequence", 0))
            keys = int(marker.get("keys_version", 0))
            return UpdateRecord(state=COMMITTED, version=version, sequence=seq,
                                keys_version=keys, installed_version=version,
                                installed_sequence=seq, installed_keys_version=keys)
        if len(data) > limits.OTA_STATE_MAX_BYTES:
            raise UpdateStateError("%s is %d bytes" % (STATE, len(data)))
        return UpdateRecord.from_bytes(data)

    def _save(self, rec: UpdateRecord, step: str) -> UpdateRecord:
        self.fault("state:%s" % step)
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / STATE, rec.to_bytes(), 0o600)
        log.info("update %s %s (seq %d)%s", rec.state, rec.version, rec.sequence,
                 ": " + rec.reason if rec.reason else "")
        return rec

    # -- starting up

    def recover(self) -> UpdateRecord:
        """Make the disk agree with the record after any stop (power cut included):
        temporary files removed, symlinks as the record says, an interrupted install
        failed. Returns the record."""
        rec = self.record()
        for tmp in (self.root / (CURRENT + ".tmp"), self.root / (PREVIOUS + ".tmp")):
            tmp.unlink(missing_ok=True)
        if self.releases.is_dir():
            for d in self.releases.iterdir():
                if d.name.endswith((".tmp", ".unpack")):
                    shutil.rmtree(d, ignore_errors=True)
        if rec.state == INSTALLING:
            rec = self._save(rec.after(FAIL, reason="interrupted while installing"), "recover")
        if rec.state == TRIAL and not self.is_bootable(rec.version) and self.is_bootable(
                rec.previous_version):  # its files went missing: it cannot be judged
            rec = self._save(rec.after(UNHEALTHY, reason="the release in trial is missing "
                                       "or incomplete on disk"), "recover")
        if rec.state == TRIAL and self.is_bootable(rec.version):
            if self.is_bootable(rec.previous_version):
                self._point(PREVIOUS, rec.previous_version)
            self._point(CURRENT, rec.version)
        elif rec.state == ROLLED_BACK and self.is_bootable(rec.previous_version):
            self._point(CURRENT, rec.previous_version)
        return rec

    def boot_check(self) -> UpdateRecord:
        """The boot guard's step before every start: count a start in trial; past the
        limit, roll back (the release never committed: it crashed or hung each time)."""
        rec = self.recover()
        if rec.state != TRIAL:
            return rec
        rec = self._save(replace(rec, trial_starts=rec.trial_starts + 1), "count-start")
        if rec.trial_starts > rec.trial_max_starts:
            return self.roll_back("%d starts in trial without a commit (limit %d)"
                                  % (rec.trial_starts - 1, rec.trial_max_starts))
        return rec

    # -- taking a release

    def check(self, release: VerifiedRelease) -> UpdateRecord:
        """Refuse a release that may not be installed now; returns the record."""
        rec = self.record()
        if release.component != COMPONENT:
            raise ReleaseRefused("the release is for %r, this is the %r"
                                 % (release.component[:40], COMPONENT))
        if release.sequence <= rec.installed_sequence:
            raise ReleaseRefused("release %s has sequence %d; the installed one has %d"
                                 % (release.version, release.sequence, rec.installed_sequence))
        if release.keys_version < rec.installed_keys_version:
            raise ReleaseRefused("release %s was verified under release-key list version %d; "
                                 "the installed one came with version %d"
                                 % (release.version, release.keys_version,
                                    rec.installed_keys_version),
                                 hint="sign the release under the current key list")
        if rec.state in BUSY:
            raise ReleaseRefused("release %s is %s; wait for its outcome"
                                 % (rec.version, rec.state), hint="")
        if release.version in (rec.installed_version, self.link(CURRENT)):
            raise ReleaseRefused("version %s is the one installed" % release.version)
        return rec

    def schedule(self, release: VerifiedRelease) -> UpdateRecord:
        rec = self.check(release)
        if rec.state in (DOWNLOADING, DOWNLOADED) and rec.sequence == release.sequence:
            if rec.keys_version < release.keys_version:  # fetched with a newer key list
                rec = self._save(replace(rec, keys_version=release.keys_version), "keys")
            return rec  # the same release again (a resume): keep its progress
        return self._save(rec.after(
            SCHEDULE, version=release.version, sequence=release.sequence, size=release.size,
            sha256=release.sha256.hex(), url=release.url, keys_version=release.keys_version,
            reason=""), "schedule")

    def part_file(self, release: VerifiedRelease) -> Path:
        return self.root / DOWNLOADS / ("%d.part" % release.sequence)

    def download(self, release: VerifiedRelease, *, ca_file: Path,
                 bounds: DownloadLimits | None = None,
                 observe: Observer | None = None,
                 stop: threading.Event | None = None) -> Path:
        """Fetch the artifact (resuming); ``downloaded`` when it is whole and its hash holds.
        An interruption leaves ``downloading`` (call again); a refusal records ``failed``."""
        rec = self.schedule(release)
        if rec.state == DOWNLOADED and self.part_file(release).is_file():
            return self.part_file(release)
        if rec.state != DOWNLOADING:
            rec = self._save(rec.after(DOWNLOAD), "download")
        try:
            part = download(release, self.part_file(release), ca_file=ca_file, bounds=bounds,
                            observe=observe, stop=stop)
        except DownloadRefused as e:
            self._save(rec.after(FAIL, reason="download refused: %s" % e), "download-failed")
            raise
        except DownloadInterrupted:
            raise
        self._save(rec.after(DOWNLOAD_DONE), "downloaded")
        return part

    def install(self, release: VerifiedRelease, artifact: Path) -> UpdateRecord:
        """Unpack and build the release beside the running one, then switch ``current``
        to it in trial. The caller exits with ``EXIT_RESTART`` afterwards."""
        rec = self.record()
        if rec.state != DOWNLOADED or rec.sequence != release.sequence:
            raise InstallFailed("release %s is not downloaded (state %s)"
                                % (release.version, rec.state))
        running = self.link(CURRENT)
        rec = self._save(rec.after(INSTALL), "installing")
        final = self.release_dir(release.version)
        try:
            if not self._holds(release):  # a rolled-back build of the same artifact is kept
                self._build(release, artifact, final)
        except BaseException as e:
            if isinstance(e, Exception):
                self._save(self.record().after(FAIL, reason="install failed: %s" % e),
                           "install-failed")
            raise
        if self.is_bootable(running):
            self._point(PREVIOUS, running)
        rec = self._save(rec.after(SWITCH, previous_version=running, trial_starts=0,
                                   trial_max_starts=self.trial_max_starts, reason=""), "trial")
        self._point(CURRENT, release.version)
        return rec

    def _holds(self, release: VerifiedRelease) -> bool:
        """Whether ``releases/<version>`` is complete and built from this very artifact."""
        try:
            marker = json.loads((self.release_dir(release.version) / MARKER).read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("sha256") == release.sha256.hex()

    def _build(self, release: VerifiedRelease, artifact: Path, final: Path) -> None:
        self.releases.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        unpacked = final.with_name(final.name + ".unpack")
        for d in (tmp, unpacked, final):
            shutil.rmtree(d, ignore_errors=True)
        unpacked.mkdir()
        try:
            self.fault("unpack")
            unpack(artifact, unpacked)
            self.fault("build")
            self.build(unpacked, tmp)
            self.fault("marker")
            marker = {"version": release.version, "sequence": release.sequence,
                      "sha256": release.sha256.hex(), "keys_version": release.keys_version}
            write_atomic(tmp / MARKER, json.dumps(marker).encode(), 0o644)
            self.fault("rename-release")
            os.replace(tmp, final)
            _fsync_dir(self.releases)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the trial's outcome

    def commit(self) -> UpdateRecord:
        """The release in trial is healthy: it becomes the installed one (its sequence and
        its key list's version the new floors). Releases other than it and the previous
        one are removed."""
        rec = self.record()
        rec = self._save(rec.after(
            HEALTHY, installed_version=rec.version, installed_sequence=rec.sequence,
            installed_keys_version=max(rec.installed_keys_version, rec.keys_version),
            reason=""), "commit")
        keep = {rec.installed_version, rec.previous_version}
        shutil.rmtree(self.root / DOWNLOADS, ignore_errors=True)
        if self.releases.is_dir():
            for d in self.releases.iterdir():
                if d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)
        return rec

    def roll_back(self, reason: str) -> UpdateRecord:
        """The release in trial failed: ``current`` goes back to the previous release."""
        rec = self.record()
        if rec.state != TRIAL:
            raise InstallFailed("nothing is in trial (state %s)" % rec.state)
        if not self.is_bootable(rec.previous_version):
            raise InstallFailed("no previous release to roll back to")
        rec = self._save(rec.after(UNHEALTHY, reason=reason[:300]), "rolled-back")
        self._point(CURRENT, rec.previous_version)
        return rec

    def update(self, release: VerifiedRelease, *, ca_file: Path,
               bounds: DownloadLimits | None = None,
               observe: Observer | None = None,
               stop: threading.Event | None = None) -> UpdateRecord:
        """Download (resuming, retrying), install and switch: the whole way to ``trial``."""
        part = self.download(release, ca_file=ca_file, bounds=bounds, observe=observe,
                             stop=stop)
        return self.install(release, part)

