"""The Raspberry Pi host collector: read a gateway's root file system into a
``HostCapture`` (``host_rules`` decides).

``collect(root)`` reads, under ``root`` (default ``/``; a mounted SD card or an unpacked
image works as well): ``/etc/ssh/sshd_config`` and what it includes, ``/etc/passwd``,
``/etc/shadow`` (reduced at once to empty/locked/hash per account: no hash is kept),
``/etc/apt/apt.conf.d/*`` and ``/etc/apt/apt.conf``, the gateway's unit and its drop-ins
(``/etc/systemd/system``, ``/run/systemd/system``, ``/lib/systemd/system``,
``/usr/lib/systemd/system``), the gateway's configuration (the unit's ``--config``) and
``lstat`` of each key path it names. Paths are joined under ``root`` and a link that
resolves outside ``root`` is not followed. Every file read is size-limited
(``LIMITS.host_file_max_bytes``), and what could not be read is listed in
``capture.errors``.

With ``run_tools`` (only for ``root`` = ``/``: the tools see the running system) it also
runs ``sshd -T`` and ``systemctl show UNIT``, when those programs are installed, for the
effective settings. ``probe_host`` is the one call the ``hw check`` orchestrator makes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from cityedge_hardware.host_parsers import HostParseError, sshd_includes
from cityedge_hardware.host_rules import (
    DEFAULT_UNIT,
    SSHD_CONFIG,
    HostCapture,
    HostDataError,
    KeyFile,
    check_host,
    config_path,
    key_paths,
    service_settings,
    shadow_states,
)
from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.verdict import Verdict
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system",
             "/usr/lib/systemd/system")  # systemd's order: the first holds the unit
SSHD_BINARIES = ("/usr/sbin/sshd", "/sbin/sshd")
UNATTENDED_BINARY = "/usr/bin/unattended-upgrade"
APT_PARTS = "/etc/apt/apt.conf.d"
APT_MAIN = "/etc/apt/apt.conf"


class HostCollectError(UserError):
    hint = ("give the gateway's root directory (--root, default /), or a capture saved "
            "with --save-capture (--capture-json)")


def reference_unit_path() -> Path:
    """The project's own unit file, ``gateway/cityedge-gateway.service`` of the source
    tree this package runs from (``make setup`` installs it in place). It is read as a
    file, not imported: the gateway is another part (``docs/ARCHITECTURE.md``, layers)."""
    return Path(__file__).resolve().parents[2] / "gateway" / DEFAULT_UNIT


class _Root:
    """Reads under one root directory, bounded, recording what failed."""

    def __init__(self, root: Path, limits: HardwareLimits, errors: list[str]) -> None:
        self.root = root.resolve()
        self.limits = limits
        self.errors = errors

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def _inside(self, p: Path) -> bool:
        return self.root == Path("/") or p.resolve().is_relative_to(self.root)

    def exists(self, host_path: str) -> bool:
        p = self.path(host_path)
        return p.exists() and self._inside(p)

    def text(self, host_path: str, quiet_missing: bool = True) -> str | None:
        p = self.path(host_path)
        try:
            if not self._inside(p):
                self.errors.append("%s: a link out of the root, not followed" % host_path)
                return None
            with p.open("rb") as f:
                data = f.read(self.limits.host_file_max_bytes + 1)
        except FileNotFoundError:
            if not quiet_missing:
                self.errors.append("%s: missing" % host_path)
            return None
        except OSError as e:
            self.errors.append("%s: %s" % (host_path, e.strerror or e))
            return None
        if len(data) > self.limits.host_file_max_bytes:
            self.errors.append("%s: larger than %d bytes, not read"
                               % (host_path, self.limits.host_file_max_bytes))
            return None
        return data.decode("utf-8", "replace")

    def listdir(self, host_dir: str) -> list[str]:
        p = self.path(host_dir)
        try:
            if not self._inside(p):
                return []
            names = sorted(os.listdir(p))
        except FileNotFoundError:
            return []
        except OSError as e:
            self.errors.append("%s: %s" % (host_dir, e.strerror or e))
            return []
        if len(names) > self.limits.host_max_conf_files:
            self.errors.append("%s: %d files, the first %d read" % (
                host_dir, len(names), self.limits.host_max_conf_files))
        return [posixpath.join(host_dir, n) for n in names[:self.limits.host_max_conf_files]
                if self.path(posixpath.join(host_dir, n)).is_file()]

    def key_file(self, host_path: str, kind: str) -> KeyFile:
        try:
            st = self.path(host_path).lstat()
        except FileNotFoundError:
            return KeyFile(host_path, kind, False)
        except OSError as e:
            self.errors.append("%s: %s" % (host_path, e.strerror or e))
            return KeyFile(host_path, kind, False)
        return KeyFile(host_path, kind, True, stat.S_ISLNK(st.st_mode), st.st_mode,
                       st.st_uid, st.st_gid)


def _sshd_files(r: _Root) -> dict[str, str]:
    files: dict[str, str] = {}
    todo = [SSHD_CONFIG]
    while todo and len(files) < r.limits.host_max_conf_files:
        pattern = todo.pop(0)
        if any(c in pattern for c in "*?["):
            parent = posixpath.dirname(pattern)
            paths = [p for p in r.listdir(parent) if fnmatch.fnmatchcase(p, pattern)]
        else:
            paths = [pattern]
        for p in paths:
            if p in files:
                continue
            text = r.text(p)
            if text is None:
                continue
            files[p] = text
            try:
                todo.extend(sshd_includes(text))
            except (HostParseError, ValueError) as e:
                r.errors.append("%s: %s" % (p, e))
    return files


def _run(argv: list[str], errors: list[str], limits: HardwareLimits) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=limits.host_tool_timeout_s,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        errors.append("%s: %s" % (argv[0], e))
        return None
    if p.returncode != 0:
        errors.append("%s: exit %d: %s" % (" ".join(argv), p.returncode, p.stderr.decode(
            "utf-8", "replace").strip()[:limits.tool_output_max_chars]))
        return None
    return p.stdout[:limits.host_file_max_bytes].decode("utf-8", "replace")


def collect(root: Path = Path("/"), unit: str = DEFAULT_UNIT, run_tools: bool = False,
            reference_unit: Path | None = None,
            limits: HardwareLimits = LIMITS) -> HostCapture:
    """Read the host under ``root`` (module docstring); ``HostCollectError`` when the root
    is not a directory or the project's unit cannot be read."""
    if not root.is_dir():
        raise HostCollectError("%s is not a directory" % root)
    if run_tools and root.resolve() != Path("/"):
        raise HostCollectError("--run-tools asks the running system, not %s" % root,
                               hint="leave --run-tools out for a root directory")
    if "/" in unit or not unit:
        raise HostCollectError("unit %r is not a unit name" % unit,
                               hint="give a name such as cityedge-gateway.service")
    ref = reference_unit or reference_unit_path()
    try:
        ref_text = ref.read_text()
    except OSError as e:
        raise HostCollectError("cannot read the project's unit %s: %s" % (ref, e.strerror),
                               hint="pass gateway/cityedge-gateway.service of the "
                               "cityedge tree with --reference-unit") from e
    cap = HostCapture(root=str(root), unit_name=unit, reference_unit=ref_text)
    r = _Root(root, limits, cap.errors)
    cap.sshd_installed = any(r.exists(b) for b in SSHD_BINARIES)
    cap.sshd_files = _sshd_files(r)
    cap.passwd = r.text("/etc/passwd", quiet_missing=False)
    shadow = r.text("/etc/shadow", quiet_missing=False)
    cap.shadow = None if shadow is None else shadow_states(shadow)
    del shadow  # the hashes go no further than this function
    cap.apt_files = [(p, t) for p in [*r.listdir(APT_PARTS), APT_MAIN]
                     if (t := r.text(p)) is not None]
    cap.unattended_installed = r.exists(UNATTENDED_BINARY)
    for d in UNIT_DIRS:
        text = r.text(posixpath.join(d, unit))
        if text is not None:
            cap.unit_files.append((posixpath.join(d, unit), text))
            break
    dropins: dict[str, str] = {}
    for d in UNIT_DIRS:
        for p in r.listdir(posixpath.join(d, unit + ".d")):
            if p.endswith(".conf"):
                dropins.setdefault(posixpath.basename(p), p)
    for name in sorted(dropins):
        text = r.text(dropins[name])
        if text is not None:
            cap.unit_files.append((dropins[name], text))
    if run_tools:
        if shutil.which("sshd") or cap.sshd_installed:
            cap.sshd_t = _run([shutil.which("sshd") or SSHD_BINARIES[0], "-T"], cap.errors,
                              limits)
        if shutil.which("systemctl"):
            cap.systemctl_show = _run(["systemctl", "show", unit, "--no-pager"],
                                      cap.errors, limits)
    service, _src = service_settings(cap)
    if service is not None:
        cap.config_path = config_path(service)
        cap.config_text = r.text(cap.config_path, quiet_missing=False)
        if cap.config_text is not None:
            try:
                cap.key_files = [r.key_file(p, kind) for p, kind in
                                 key_paths(cap.config_text, cap.config_path)]
            except HostParseError as e:
                cap.errors.append(str(e))
                cap.config_text = None
    return cap


def load_capture(path: Path) -> HostCapture:
    """A capture saved with ``save_capture`` (``HostCollectError`` if it is not one)."""
    try:
        with path.open("rb") as f:
            data = f.read(LIMITS.host_capture_max_bytes + 1)
    except OSError as e:
        raise HostCollectError("cannot read %s: %s" % (path, e.strerror or e)) from e
    if len(data) > LIMITS.host_capture_max_bytes:
        raise HostCollectError("%s is larger than a host capture can be (%d bytes)"
                               % (path, LIMITS.host_capture_max_bytes))
    try:
        return HostCapture.from_json(json.loads(data))
    except (ValueError, HostDataError) as e:
        raise HostCollectError("%s is not a host capture: %s" % (path, e)) from e


def save_capture(capture: HostCapture, path: Path) -> None:
    """Write ``capture`` as JSON (mode 0600: it lists the host's accounts)."""
    write_atomic(path, json.dumps(capture.to_json(), indent=1).encode() + b"\n", 0o600)


def probe_host(root: Path = Path("/"), *, unit: str = DEFAULT_UNIT, run_tools: bool = False,
               capture_json: Path | None = None, reference_unit: Path | None = None,
               save_to: Path | None = None,
               progress: Callable[[str], None] | None = None) -> list[Verdict]:
    """Every host verdict: from a saved capture, or read from ``root`` now."""
    if capture_json is not None:
        if progress is not None:
            progress("host: reading the capture %s" % capture_json)
        cap = load_capture(capture_json)
    else:
        if progress is not None:
            progress("host: reading %s%s" % (root, " and asking sshd and systemctl"
                                             if run_tools else ""))
        cap = collect(root, unit, run_tools, reference_unit)
    if save_to is not None:
        save_capture(cap, save_to)
    return check_host(cap)
