"""The Raspberry Pi gateway host rules: a capture of the host's settings in, verdicts out.

Sans-IO: ``check_host(capture)`` reads nothing but a ``HostCapture`` (``host_collect``
reads a root directory into one, and can save it as JSON; ``--capture-json`` reads it
back). The files are parsed by ``host_parsers``. The checks, each with its requirement:

1. ``ssh-password`` (CE-AUTH-03): no SSH login by password. ``PasswordAuthentication``
   (OpenSSH's default: yes), keyboard-interactive with PAM (``KbdInteractiveAuthentication``
   or its old name ``ChallengeResponseAuthentication``, default yes, with ``UsePAM yes``)
   and ``PermitEmptyPasswords`` must all be off, globally (``sshd -T`` when it ran, else the
   files) and in every ``Match`` block. No SSH server installed passes.
2. ``ssh-root-login`` (CE-SYS-02): ``PermitRootLogin no`` (the default,
   ``prohibit-password``, still lets a root key in), globally and in every ``Match``.
3. ``default-accounts`` (CE-AUTH-01): no account with an empty password, and no account of
   a vendor image's well-known name (``DEFAULT_ACCOUNTS``: ``pi`` ...) with a password
   hash. The password field of ``/etc/shadow`` is reduced to ``empty`` / ``locked`` /
   ``hash`` when it is read (``shadow_states``): no hash is ever kept or saved. ``could not
   decide`` when ``/etc/shadow`` could not be read and nothing failed without it.
4. ``unattended-upgrades`` (CE-UPD-01): the ``unattended-upgrades`` package is installed,
   ``APT::Periodic::Update-Package-Lists`` and ``APT::Periodic::Unattended-Upgrade`` are
   on (a number of days above 0, or ``always``), and an origin to install from is set
   (``Unattended-Upgrade::Origins-Pattern`` or ``::Allowed-Origins``), in the files apt
   reads (``apt.conf.d`` in name order, then ``apt.conf``).
5. ``service-user`` (CE-SYS-02): the gateway unit runs as a named user (or
   ``DynamicUser=yes``) that is not root (uid 0 in the host's ``/etc/passwd``).
6. ``service-hardening`` (CE-SYS-04): every option the project's own unit
   (``gateway/cityedge-gateway.service``) lists under its ``# hardening`` comment is set on
   the host's unit at least as strictly (``at_least``): the reference is read from that
   file, so the rule follows the unit when it changes.
7. ``key-files`` (CE-DATA-05): each private key path of the gateway's configuration
   (``[gateway] key_file``, ``[broker] key_file``, ``[node_link] key_file``, the key slots
   under ``identity_dir``; the config path is the unit's ``--config``) that exists is a
   regular file no group or other user may read (mode ``& 0o077 == 0``), owned by root or
   the service user; ``identity_dir`` itself is mode 0700. ``could not decide`` when the
   configuration or every key is missing.

Without the unit, checks 5-7 cannot decide (the gateway is not installed, or under
another name: ``--unit``).
"""

from __future__ import annotations

import posixpath
import shlex
import stat
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any

from cityedge_hardware.host_parsers import (
    LIST_SETTINGS,
    AptConf,
    HostParseError,
    apt_conf_file_used,
    parse_apt_conf,
    parse_sshd_config,
    parse_sshd_t,
    parse_systemctl_show,
    parse_unit,
    unit_settings,
)
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

CAPTURE_SCHEMA = "cityedge-host-capture/1"
DEFAULT_UNIT = "cityedge-gateway.service"
DEFAULT_CONFIG = "/etc/cityedge/gateway.toml"
SSHD_CONFIG = "/etc/ssh/sshd_config"
# Login names vendor images ship with (Raspberry Pi OS, Ubuntu, Debian cloud, Arch ARM,
# DietPi): with a password they are the first thing an attacker tries.
DEFAULT_ACCOUNTS = ("pi", "ubuntu", "debian", "admin", "alarm", "dietpi")
KEY_SLOTS = ("key0.pem", "key1.pem")  # cityedge_gateway.key_slots.KeySlots.key_file

REQ_SSH = "CE-AUTH-03"
REQ_PRIV = "CE-SYS-02"
REQ_ACCOUNTS = "CE-AUTH-01"
REQ_UPDATES = "CE-UPD-01"
REQ_CONFINE = "CE-SYS-04"
REQ_KEYS = "CE-DATA-05"

_ON = {"yes", "true", "on", "1"}
_OFF = {"no", "false", "off", "0"}
# Enumerated settings from weakest to strictest (systemd.exec(5)).
_ORDERED = {
    "ProtectSystem": ("no", "yes", "full", "strict"),
    "ProtectHome": ("no", "read-only", "tmpfs", "yes"),
    "ProtectProc": ("default", "ptraceable", "noaccess", "invisible"),
}
# Settings whose value is a set of things allowed: fewer is stricter.
_ALLOW_SETS = frozenset({"RestrictAddressFamilies", "ReadWritePaths", "SystemCallFilter",
                         "CapabilityBoundingSet", "AmbientCapabilities",
                         "SupplementaryGroups", "DeviceAllow", "SystemCallArchitectures"})


# Allow-sets whose empty value allows nothing (``CapabilityBoundingSet=``: no capability);
# for the others an empty value resets the setting to "everything" (systemd.exec(5)).
_EMPTY_IS_NONE = frozenset({"ReadWritePaths", "CapabilityBoundingSet", "AmbientCapabilities",
                            "SupplementaryGroups"})


class HostDataError(ValueError):
    """A host capture that is not what ``host_collect`` writes."""


@dataclass(frozen=True)
class KeyFile:
    """What ``lstat`` said about one key path (``exists`` False: nothing there)."""

    path: str
    kind: str  # "key" or "dir" (identity_dir)
    exists: bool
    is_link: bool = False
    mode: int = 0  # st_mode
    uid: int = -1
    gid: int = -1


@dataclass
class HostCapture:
    """Everything the host rules read. Paths are the host's (absolute, under its root)."""

    root: str = "/"
    sshd_installed: bool = False
    sshd_files: dict[str, str] = field(default_factory=dict)  # path -> text
    sshd_t: str | None = None  # `sshd -T` output, when it ran
    passwd: str | None = None
    shadow: list[tuple[str, str]] | None = None  # (user, empty|locked|hash)
    apt_files: list[tuple[str, str]] = field(default_factory=list)  # in apt's order
    unattended_installed: bool = False
    unit_name: str = DEFAULT_UNIT
    unit_files: list[tuple[str, str]] = field(default_factory=list)  # unit, drop-ins
    systemctl_show: str | None = None
    reference_unit: str = ""
    config_path: str | None = None
    config_text: str | None = None
    key_files: list[KeyFile] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "path: why" for what was not read

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shadow"] = None if self.shadow is None else [list(s) for s in self.shadow]
        d["apt_files"] = [list(a) for a in self.apt_files]
        d["unit_files"] = [list(u) for u in self.unit_files]
        return {"schema": CAPTURE_SCHEMA, **d}

    @classmethod
    def from_json(cls, doc: Any) -> HostCapture:
        """A capture from ``to_json``'s output; ``HostDataError`` names the bad field."""
        if not isinstance(doc, dict) or doc.get("schema") != CAPTURE_SCHEMA:
            raise HostDataError("not a host capture (schema %r expected)" % CAPTURE_SCHEMA)
        known = set(cls.__dataclass_fields__)
        unknown = set(doc) - known - {"schema"}
        if unknown:
            raise HostDataError("unknown fields: %s" % ", ".join(sorted(unknown)))

        def typed(name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            v = doc.get(name, None if optional else cls.__dataclass_fields__[name].default)
            if v is None and optional:
                return None
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise HostDataError("field %s: wrong type" % name)
            return v

        def pairs(name: str) -> list[tuple[str, str]]:
            v = doc.get(name, [])
            if not isinstance(v, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                    for p in v):
                raise HostDataError("field %s: a list of [text, text] pairs" % name)
            return [(p[0], p[1]) for p in v]

        sshd_files = doc.get("sshd_files", {})
        if not isinstance(sshd_files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in sshd_files.items()):
            raise HostDataError("field sshd_files: a map of path to text")
        shadow = pairs("shadow") if doc.get("shadow") is not None else None
        keys = []
        for k in doc.get("key_files", []):
            if not isinstance(k, dict) or set(k) - set(KeyFile.__dataclass_fields__):
                raise HostDataError("field key_files: entries as KeyFile")
            try:
                keys.append(KeyFile(**k))
            except TypeError as e:
                raise HostDataError("field key_files: %s" % e) from e
            if not (isinstance(keys[-1].path, str) and isinstance(keys[-1].mode, int)
                    and isinstance(keys[-1].uid, int)):
                raise HostDataError("field key_files: path text, mode and uid numbers")
        errors = doc.get("errors", [])
        if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
            raise HostDataError("field errors: a list of text")
        return cls(root=typed("root", str), sshd_installed=typed("sshd_installed", bool),
                   sshd_files=dict(sshd_files), sshd_t=typed("sshd_t", str, True),
                   passwd=typed("passwd", str, True), shadow=shadow,
                   apt_files=pairs("apt_files"),
                   unattended_installed=typed("unattended_installed", bool),
                   unit_name=typed("unit_name", str), unit_files=pairs("unit_files"),
                   systemctl_show=typed("systemctl_show", str, True),
                   reference_unit=typed("reference_unit", str),
                   config_path=typed("config_path", str, True),
                   config_text=typed("config_text", str, True), key_files=keys,
                   errors=list(errors))


# --------------------------------------------------------------------------------------
# helpers the collector uses too (pure)


def shadow_states(text: str) -> list[tuple[str, str]]:
    """``(user, state)`` per line of ``/etc/shadow``: the password field reduced to
    ``empty``, ``locked`` (``!``/``*`` first) or ``hash``; the hash itself is dropped."""
    out = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < 2 or not parts[0]:
            continue
        pw = parts[1]
        out.append((parts[0], "empty" if pw == "" else
                    "locked" if pw[0] in "!*" else "hash"))
    return out


def passwd_entries(text: str | None) -> dict[str, tuple[str, int, str]]:
    """``user -> (password field, uid, shell)`` from ``/etc/passwd``."""
    out: dict[str, tuple[str, int, str]] = {}
    for line in (text or "").splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[0] and parts[2].isdigit():
            out[parts[0]] = (parts[1], int(parts[2]), parts[6])
    return out


def config_path(service: dict[str, str]) -> str:
    """The gateway's configuration file: ``--config`` of the unit's ``ExecStart``."""
    try:
        argv = shlex.split(service.get("ExecStart", "").lstrip("-@:+!"))
    except ValueError:
        return DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return DEFAULT_CONFIG


def key_paths(config_text: str, path: str) -> list[tuple[str, str]]:
    """``(path, kind)`` of each private key (and the key-slot directory) the gateway's
    configuration names; relative paths are the config file's directory's, as the
    gateway resolves them. ``HostParseError`` when the TOML does not parse."""
    try:
        doc = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as e:
        raise HostParseError("%s: %s" % (path, e)) from e
    base = posixpath.dirname(path)
    out: list[tuple[str, str]] = []

    def add(p: Any, kind: str) -> None:
        if isinstance(p, str) and p:
            full = posixpath.normpath(posixpath.join(base, p))
            if (full, kind) not in out:
                out.append((full, kind))

    for table in ("gateway", "broker", "node_link"):
        t = doc.get(table)
        if isinstance(t, dict):
            add(t.get("key_file"), "key")
    g = doc.get("gateway")
    ident = g.get("identity_dir") if isinstance(g, dict) else None
    if isinstance(ident, str) and ident:
        add(ident, "dir")
        for slot in KEY_SLOTS:
            add(posixpath.join(ident, slot), "key")
    return out


def service_settings(capture: HostCapture) -> tuple[dict[str, str] | None, str]:
    """The unit's effective [Service] settings and where they came from; None if the
    unit is not installed."""
    if capture.systemctl_show is not None:
        shown = parse_systemctl_show(capture.systemctl_show)
        if shown.get("LoadState") == "loaded":
            return shown, "systemctl show %s" % capture.unit_name
    if capture.unit_files:
        try:
            return (unit_settings([t for _p, t in capture.unit_files]),
                    ", ".join(p for p, _t in capture.unit_files))
        except HostParseError as e:
            return None, "%s does not parse: %s" % (capture.unit_name, e)
    return None, "the unit %s is not installed here" % capture.unit_name


def reference_hardening(reference_unit: str) -> dict[str, str]:
    """The [Service] options the project's unit lists under its ``# hardening`` comment."""
    out: dict[str, str] = {}
    for section, key, value, hardening in parse_unit(reference_unit):
        if section == "Service" and hardening:
            out[key] = out[key] + " " + value if key in LIST_SETTINGS and key in out \
                else value
    if not out:
        raise HostParseError("the reference unit has no options under a '# hardening' "
                             "comment in [Service]")
    return out


# --------------------------------------------------------------------------------------
# the checks


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    return True if v in _ON else False if v in _OFF else default


def _sshd(capture: HostCapture) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]],
                                         str] | str:
    """(global settings, Match blocks, source), or why they could not be read."""
    matches: list[tuple[str, dict[str, str]]] = []
    settings: dict[str, str] | None = None
    source = ""
    if SSHD_CONFIG in capture.sshd_files:
        try:
            cfg = parse_sshd_config(capture.sshd_files, SSHD_CONFIG)
        except HostParseError as e:
            return "%s: %s" % (SSHD_CONFIG, e)
        settings, matches, source = cfg.settings, cfg.matches, SSHD_CONFIG
    if capture.sshd_t is not None:
        settings, source = parse_sshd_t(capture.sshd_t), "sshd -T"
    if settings is None:
        why = [e for e in capture.errors if e.startswith(SSHD_CONFIG)]
        if why:
            return why[0]
        settings, source = {}, "OpenSSH defaults (no %s)" % SSHD_CONFIG
    return settings, matches, source


def _no_sshd(req: str, check: str) -> Verdict:
    return Verdict(req, check, Outcome.PASS, "no SSH server is installed",
                   (Evidence("sshd", "absent"),))


def _sshd_settings(capture: HostCapture, req: str, check: str
                   ) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]], str] | Verdict:
    """sshd's effective settings ``(global, matches, source)``, or the verdict when there is
    no SSH server or its settings could not be read (both SSH checks start here)."""
    if not capture.sshd_installed and not capture.sshd_files:
        return _no_sshd(req, check)
    got = _sshd(capture)
    if isinstance(got, str):
        return Verdict(req, check, Outcome.UNDECIDED, "the SSH settings could not be read",
                       (Evidence("sshd_config", got),),
                       fix="run the probe as root (sudo) so /etc/ssh can be read")
    return got


def check_ssh_password(capture: HostCapture) -> Verdict:
    req, check = REQ_SSH, "ssh-password"
    fix = ("set `PasswordAuthentication no` and `KbdInteractiveAuthentication no` in "
           "/etc/ssh/sshd_config (before any Match block and in none of them), keep "
           "`PermitEmptyPasswords no`, log in with keys, then `systemctl reload ssh`")
    got = _sshd_settings(capture, req, check)
    if isinstance(got, Verdict):
        return got
    settings, matches, source = got
    bad: list[Evidence] = []
    for where, s in [("global", settings), *(("Match " + c, m) for c, m in matches)]:
        is_global = where == "global"
        pw = s.get("passwordauthentication")
        kbd = s.get("kbdinteractiveauthentication", s.get("challengeresponseauthentication"))
        if _flag(pw, is_global):
            bad.append(Evidence(where + ": PasswordAuthentication", pw or "yes (default)"))
        pam = _flag(settings.get("usepam"), False) or _flag(s.get("usepam"), False)
        if _flag(kbd, is_global) and pam:
            bad.append(Evidence(where + ": KbdInteractiveAuthentication",
                                kbd or "yes (default)", "with UsePAM yes: PAM asks for "
                                "the password"))
        if _flag(s.get("permitemptypasswords"), False):
            bad.append(Evidence(where + ": PermitEmptyPasswords", s["permitemptypasswords"]))
    if bad:
        return Verdict(req, check, Outcome.FAIL, "SSH accepts passwords (%s)" % source,
                       tuple(bad), fix=fix)
    return Verdict(req, check, Outcome.PASS, "SSH takes keys only (%s)" % source,
                   (Evidence("PasswordAuthentication",
                             settings.get("passwordauthentication", "")),
                    Evidence("Match blocks", str(len(matches)))))


def check_ssh_root(capture: HostCapture) -> Verdict:
    req, check = REQ_PRIV, "ssh-root-login"
    fix = ("set `PermitRootLogin no` in /etc/ssh/sshd_config (and in no Match block "
           "otherwise); administrators log in as themselves and use sudo")
    got = _sshd_settings(capture, req, check)
    if isinstance(got, Verdict):
        return got
    settings, matches, source = got
    bad = []
    value = settings.get("permitrootlogin", "prohibit-password (default)")
    if value.lower() != "no":
        bad.append(Evidence("global: PermitRootLogin", value))
    for crit, m in matches:
        v = m.get("permitrootlogin")
        if v is not None and v.lower() != "no":
            bad.append(Evidence("Match %s: PermitRootLogin" % crit, v))
    if bad:
        return Verdict(req, check, Outcome.FAIL, "root may log in over SSH (%s)" % source,
                       tuple(bad), fix=fix)
    return Verdict(req, check, Outcome.PASS, "root may not log in over SSH (%s)" % source,
                   (Evidence("PermitRootLogin", "no"),))


def check_accounts(capture: HostCapture) -> Verdict:
    req, check = REQ_ACCOUNTS, "default-accounts"
    fix = ("lock or remove the image's default account (`sudo usermod -L -e 1 pi` or "
           "`sudo deluser --remove-home pi`) after creating your own, and give every "
           "account a password or lock it (`passwd -l`)")
    if capture.passwd is None:
        return Verdict(req, check, Outcome.UNDECIDED, "/etc/passwd could not be read",
                       fix="run the probe on the gateway's root file system")
    users = passwd_entries(capture.passwd)
    bad: list[Evidence] = []
    for name, (pw, _uid, _shell) in users.items():
        if pw == "":
            bad.append(Evidence("passwd: " + name, "empty password field"))
        elif pw not in ("x", "*", "!", "!!") and name in DEFAULT_ACCOUNTS:
            bad.append(Evidence("passwd: " + name, "password hash", "a default account"))
    if capture.shadow is not None:
        for name, state in capture.shadow:
            if state == "empty":
                bad.append(Evidence("shadow: " + name, "empty password", "logs in with none"))
            elif state == "hash" and name in DEFAULT_ACCOUNTS:
                bad.append(Evidence("shadow: " + name, "password hash",
                                    "a default account of a vendor image"))
    if bad:
        return Verdict(req, check, Outcome.FAIL, "%d account(s) with a default name and a "
                       "password, or with no password" % len(bad), tuple(bad), fix=fix)
    if capture.shadow is None:
        return Verdict(req, check, Outcome.UNDECIDED, "/etc/shadow could not be read: "
                       "whether the accounts have passwords is unknown",
                       tuple(Evidence(e.split(":", 1)[0], e.split(":", 1)[-1].strip())
                             for e in capture.errors if "shadow" in e),
                       fix="run the probe as root (sudo) so /etc/shadow can be read")
    present = [n for n in DEFAULT_ACCOUNTS if n in users]
    return Verdict(req, check, Outcome.PASS, "no account has an empty password or a default "
                   "name with a password (%d accounts)" % len(users),
                   tuple(Evidence("account " + n, "locked") for n in present))


def _days_on(value: str | None) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    return v == "always" or (v.isdigit() and int(v) > 0)


def check_unattended(capture: HostCapture) -> Verdict:
    req, check = REQ_UPDATES, "unattended-upgrades"
    fix = ("`sudo apt install unattended-upgrades` and `sudo dpkg-reconfigure -plow "
           "unattended-upgrades` (writes /etc/apt/apt.conf.d/20auto-upgrades with "
           "APT::Periodic::Update-Package-Lists \"1\" and APT::Periodic::Unattended-Upgrade "
           "\"1\"); keep the security origin in 50unattended-upgrades")
    conf = AptConf()
    problems: list[Evidence] = []
    used = []
    for path, text in capture.apt_files:
        name = posixpath.basename(path)
        if path.startswith("/etc/apt/apt.conf.d/") and not apt_conf_file_used(name):
            continue  # apt ignores it too (e.g. 20auto-upgrades.dpkg-old)
        try:
            parse_apt_conf(text, conf)
        except HostParseError as e:
            problems.append(Evidence(path, "not read", str(e)))
            continue
        used.append(path)
    lists_on = conf.values.get("apt::periodic::update-package-lists")
    upgrade_on = conf.values.get("apt::periodic::unattended-upgrade")
    origins = (conf.lists.get("unattended-upgrade::origins-pattern", [])
               + conf.lists.get("unattended-upgrade::allowed-origins", []))
    bad: list[Evidence] = []
    if not capture.unattended_installed:
        bad.append(Evidence("unattended-upgrades", "not installed",
                            "/usr/bin/unattended-upgrade is missing"))
    if not _days_on(lists_on):
        bad.append(Evidence("APT::Periodic::Update-Package-Lists", lists_on or "unset"))
    if not _days_on(upgrade_on):
        bad.append(Evidence("APT::Periodic::Unattended-Upgrade", upgrade_on or "unset"))
    if not origins:
        bad.append(Evidence("Unattended-Upgrade::Origins-Pattern", "empty",
                            "nothing would be installed"))
    if bad:
        return Verdict(req, check, Outcome.FAIL, "security updates are not installed "
                       "unattended", (*bad, *problems), fix=fix)
    return Verdict(req, check, Outcome.PASS, "unattended-upgrades installs updates every %s "
                   "day(s) from %d origin(s)" % (upgrade_on, len(origins)),
                   (*(Evidence("origin", o) for o in origins[:8]),
                    Evidence("files", str(len(used)), ", ".join(used[-4:])), *problems))


_UNIT_FIX = ("install the project's unit (gateway/cityedge-gateway.service) unchanged in "
             "/etc/systemd/system/, then `systemctl daemon-reload`; or name yours with "
             "--unit")


def _no_unit(req: str, check: str, why: str) -> Verdict:
    return Verdict(req, check, Outcome.UNDECIDED, why, fix=_UNIT_FIX)


def check_service_user(capture: HostCapture) -> Verdict:
    req, check = REQ_PRIV, "service-user"
    service, source = service_settings(capture)
    if service is None:
        return _no_unit(req, check, source)
    fix = ("run the gateway as its own user: `User=cityedge` and `Group=cityedge` as in "
           "the project's unit (`sudo useradd --system --home /var/lib/cityedge cityedge`)")
    if _flag(service.get("DynamicUser"), False):
        return Verdict(req, check, Outcome.PASS, "the service runs as a dynamic user "
                       "(%s)" % source, (Evidence("DynamicUser", "yes"),))
    user = service.get("User", "")
    if user in ("", "root", "0"):
        return Verdict(req, check, Outcome.FAIL, "the service runs as root (%s)" % source,
                       (Evidence("User", user or "unset", "systemd's default is root"),),
                       fix=fix)
    users = passwd_entries(capture.passwd)
    entry = users.get(user) if not user.isdigit() else next(
        (e for e in users.values() if e[1] == int(user)), None)
    if capture.passwd is not None and entry is None:
        return Verdict(req, check, Outcome.FAIL, "the service's user %s does not exist"
                       % user, (Evidence("User", user, "not in /etc/passwd"),), fix=fix)
    if entry is not None and entry[1] == 0:
        return Verdict(req, check, Outcome.FAIL, "the service's user %s has uid 0" % user,
                       (Evidence("User", user, "uid 0 is root"),), fix=fix)
    return Verdict(req, check, Outcome.PASS, "the service runs as %s (%s)" % (user, source),
                   (Evidence("User", user, "uid %d" % entry[1] if entry else
                             "uid not checked: /etc/passwd not read"),))


def _norm(value: str) -> str:
    v = value.strip().lower()
    return "yes" if v in _ON else "no" if v in _OFF else value.strip()


def at_least(key: str, host: str | None, ref: str) -> bool:
    """True if the host's value of ``key`` is as strict as the reference's or stricter."""
    if host is None:
        return False
    h, r = _norm(host), _norm(ref)
    if key in _ORDERED:
        order = _ORDERED[key]
        return h in order and r in order and order.index(h) >= order.index(r)
    if key == "UMask":
        try:
            hm, rm = int(h, 8), int(r, 8)
        except ValueError:
            return False
        return hm & rm == rm
    if key == "RestrictNamespaces":
        return h == r or h == "yes"
    if key in _ALLOW_SETS:
        if h.startswith("~") or r.startswith("~"):
            return h == r  # a deny list is compared as written
        hs, rs = set(h.split()), set(r.split())
        return hs <= rs and (bool(hs) or key in _EMPTY_IS_NONE)
    return h == r


def check_hardening(capture: HostCapture) -> Verdict:
    req, check = REQ_CONFINE, "service-hardening"
    service, source = service_settings(capture)
    if service is None:
        return _no_unit(req, check, source)
    try:
        ref = reference_hardening(capture.reference_unit)
    except HostParseError as e:
        return Verdict(req, check, Outcome.UNDECIDED, "the project's unit cannot be read: "
                       "%s" % e, fix="pass the project's gateway/cityedge-gateway.service "
                       "with --reference-unit")
    weaker = [Evidence(key, service.get(key, "unset"), "the project's unit: %s" % value)
              for key, value in ref.items() if not at_least(key, service.get(key), value)]
    if weaker:
        return Verdict(req, check, Outcome.FAIL, "%d of the project unit's %d hardening "
                       "options are missing or weaker (%s)" % (len(weaker), len(ref), source),
                       tuple(weaker), fix=_UNIT_FIX.split("; or")[0] + " (or add each "
                       "option named above with the project's value)")
    return Verdict(req, check, Outcome.PASS, "all %d hardening options of the project's "
                   "unit are set (%s)" % (len(ref), source),
                   (Evidence("options", ", ".join(ref)),))


def check_key_files(capture: HostCapture) -> Verdict:
    req, check = REQ_KEYS, "key-files"
    fix = ("`sudo chown cityedge:cityedge KEY && sudo chmod 0600 KEY` for each key named "
           "(and `chmod 0700` the identity directory)")
    if capture.config_text is None:
        return Verdict(req, check, Outcome.UNDECIDED, "the gateway's configuration %s "
                       "could not be read" % (capture.config_path or DEFAULT_CONFIG),
                       tuple(Evidence(e.split(":", 1)[0], e.split(":", 1)[-1].strip())
                             for e in capture.errors if capture.config_path
                             and e.startswith(capture.config_path)),
                       fix="run the probe as root (sudo) on the gateway, with --unit if "
                       "the gateway's unit has another name")
    service, _src = service_settings(capture)
    user = (service or {}).get("User", "")
    users = passwd_entries(capture.passwd)
    service_uid = users[user][1] if user in users else None
    bad: list[Evidence] = []
    good: list[Evidence] = []
    for k in capture.key_files:
        if not k.exists:
            continue
        perm = stat.S_IMODE(k.mode)
        if k.is_link:
            bad.append(Evidence(k.path, "a symbolic link", "keys are regular files the "
                                "gateway wrote; the checker does not follow links"))
            continue
        want_dir = k.kind == "dir"
        if want_dir != stat.S_ISDIR(k.mode) or not (want_dir or stat.S_ISREG(k.mode)):
            bad.append(Evidence(k.path, "not a %s" % ("directory" if want_dir
                                                      else "regular file")))
            continue
        if perm & 0o077:
            bad.append(Evidence(k.path, "mode %04o" % perm, "group or others have access"))
        if k.uid != 0 and service_uid is not None and k.uid != service_uid:
            owner = next((n for n, e in users.items() if e[1] == k.uid), str(k.uid))
            bad.append(Evidence(k.path, "owner %s" % owner, "neither root nor %s" % user))
        if not bad or bad[-1].field != k.path:
            good.append(Evidence(k.path, "mode %04o" % perm, "uid %d" % k.uid))
    if bad:
        return Verdict(req, check, Outcome.FAIL, "%d gateway key file(s) are readable by "
                       "others or owned by another user" % len({e.field for e in bad}),
                       (*bad, *good), fix=fix)
    if not good:
        return Verdict(req, check, Outcome.UNDECIDED, "none of the %d key paths of %s "
                       "exists yet" % (len(capture.key_files), capture.config_path),
                       tuple(Evidence(k.path, "absent") for k in capture.key_files),
                       fix="run the probe after the gateway's first start")
    return Verdict(req, check, Outcome.PASS, "%d gateway key file(s) are private to the "
                   "service" % len(good), tuple(good))


def check_host(capture: HostCapture) -> list[Verdict]:
    """Every host verdict, in the order of the module docstring."""
    return [check_ssh_password(capture), check_ssh_root(capture), check_accounts(capture),
            check_unattended(capture), check_service_user(capture), check_hardening(capture),
            check_key_files(capture)]
