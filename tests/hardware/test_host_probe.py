"""The Raspberry Pi host probe (``cityedge hw host``) on root directories built from the
project's own unit (``gateway/cityedge-gateway.service``) and example configuration: the
hardened root passes every check, and each weakening fails the check it should, and only
that one."""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityedge.cli import app
from cityedge_hardware.host_collect import (
    collect,
    load_capture,
    probe_host,
    reference_unit_path,
    save_capture,
)
from cityedge_hardware.host_rules import (
    HostCapture,
    at_least,
    check_accounts,
    check_host,
    reference_hardening,
)
from cityedge_hardware.verdict import Outcome, Verdict

from support.hw_host import (
    AUTO_UPGRADES,
    HASH,
    SSHD_MAIN,
    UNIT,
    hardened_root,
    write,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return hardened_root(tmp_path / "root")


def outcomes(root: Path) -> dict[str, Verdict]:
    return {v.check: v for v in probe_host(root, reference_unit=UNIT)}


def only_failure(root: Path, check: str) -> Verdict:
    """The verdict of ``check``, after asserting every other check still passes."""
    got = outcomes(root)
    others = {k: v.outcome for k, v in got.items() if k != check}
    assert set(others.values()) == {Outcome.PASS}, {k: got[k].reason for k in others}
    return got[check]


def test_the_hardened_root_passes_every_check(root: Path) -> None:
    got = outcomes(root)
    assert {k: v.outcome for k, v in got.items()} == dict.fromkeys(
        ["ssh-password", "ssh-root-login", "default-accounts", "unattended-upgrades",
         "service-user", "service-hardening", "key-files"], Outcome.PASS), \
        {k: v.reason for k, v in got.items()}
    assert {v.requirement for v in got.values()} == {
        "CE-AUTH-03", "CE-SYS-02", "CE-AUTH-01", "CE-UPD-01", "CE-SYS-04", "CE-DATA-05"}
    keys = {e.field for e in got["key-files"].evidence}
    assert keys == {"/etc/cityedge/gateway.key", "/var/lib/cityedge/identity",
                    "/var/lib/cityedge/identity/key0.pem"}


WEAKENINGS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "password login on": ("ssh-password", lambda r: write(
        r, "/etc/ssh/sshd_config.d/50-cityedge.conf",
        "PasswordAuthentication yes\nPermitRootLogin no\n"), "PasswordAuthentication"),
    "password setting left to the default": ("ssh-password", lambda r: (write(
        r, "/etc/ssh/sshd_config", SSHD_MAIN.replace("PasswordAuthentication yes\n", "")),
        write(r, "/etc/ssh/sshd_config.d/50-cityedge.conf", "PermitRootLogin no\n")),
        "yes (default)"),
    "password login for a Match block": ("ssh-password", lambda r: write(
        r, "/etc/ssh/sshd_config", SSHD_MAIN.replace("PasswordAuthentication yes",
                                                     "Match Address 10.0.0.0/8\n"
                                                     "  PasswordAuthentication yes")),
        "Match Address 10.0.0.0/8: PasswordAuthentication"),
    "keyboard-interactive through PAM": ("ssh-password", lambda r: write(
        r, "/etc/ssh/sshd_config", SSHD_MAIN.replace("KbdInteractiveAuthentication no",
                                                     "KbdInteractiveAuthentication yes")),
        "KbdInteractiveAuthentication"),
    "root login by key": ("ssh-root-login", lambda r: write(
        r, "/etc/ssh/sshd_config.d/50-cityedge.conf", "PasswordAuthentication no\n"),
        "prohibit-password (default)"),
    "pi with a password": ("default-accounts", lambda r: write(
        r, "/etc/shadow", (r / "etc/shadow").read_text().replace("pi:!:", "pi:%s:" % HASH)),
        "shadow: pi"),
    "an account without a password": ("default-accounts", lambda r: write(
        r, "/etc/shadow", (r / "etc/shadow").read_text().replace("ops:%s:" % HASH, "ops::")),
        "shadow: ops"),
    "unattended-upgrades off": ("unattended-upgrades", lambda r: write(
        r, "/etc/apt/apt.conf.d/20auto-upgrades", AUTO_UPGRADES.replace(
            'Unattended-Upgrade "1"', 'Unattended-Upgrade "0"')),
        "APT::Periodic::Unattended-Upgrade"),
    "its setting in a file apt ignores": ("unattended-upgrades", lambda r: (
        r / "etc/apt/apt.conf.d/20auto-upgrades").rename(
            r / "etc/apt/apt.conf.d/20auto-upgrades.dpkg-old"),
        "APT::Periodic::Update-Package-Lists"),
    "unattended-upgrades not installed": ("unattended-upgrades", lambda r: (
        r / "usr/bin/unattended-upgrade").unlink(), "unattended-upgrades"),
    "unit without User": ("service-user", lambda r: write(
        r, "/etc/systemd/system/cityedge-gateway.service", UNIT.read_text().replace(
            "User=cityedge\n", "")), "User"),
    "unit without NoNewPrivileges": ("service-hardening", lambda r: write(
        r, "/etc/systemd/system/cityedge-gateway.service", UNIT.read_text().replace(
            "NoNewPrivileges=true\n", "")), "NoNewPrivileges"),
    "a drop-in loosening the unit": ("service-hardening", lambda r: write(
        r, "/etc/systemd/system/cityedge-gateway.service.d/override.conf",
        "[Service]\nProtectSystem=full\nRestrictAddressFamilies=AF_PACKET\n"),
        "ProtectSystem"),
    "key mode 0644": ("key-files", lambda r: (r / "etc/cityedge/gateway.key").chmod(0o644),
                      "/etc/cityedge/gateway.key"),
    "identity directory open to others": ("key-files", lambda r: (
        r / "var/lib/cityedge/identity").chmod(0o755), "/var/lib/cityedge/identity"),
}


@pytest.mark.parametrize("case", sorted(WEAKENINGS))
def test_each_weakening_fails_its_own_check(root: Path, case: str) -> None:
    check, weaken, field = WEAKENINGS[case]
    weaken(root)
    v = only_failure(root, check)
    assert v.outcome is Outcome.FAIL, v
    assert any(e.field.endswith(field) or e.raw == field or e.field == field
               for e in v.evidence), v.evidence
    assert v.fix


def test_the_first_sshd_value_wins_as_sshd_reads_it(root: Path) -> None:
    # SSHD_MAIN ends with "PasswordAuthentication yes", after the include said "no"
    got = outcomes(root)["ssh-password"]
    assert got.outcome is Outcome.PASS
    assert got.evidence[0].raw == "no"


def test_a_key_that_is_a_link_is_not_followed(root: Path) -> None:
    key = root / "etc/cityedge/gateway.key"
    key.unlink()
    key.symlink_to("/etc/passwd")
    v = only_failure(root, "key-files")
    assert v.outcome is Outcome.FAIL
    assert ("/etc/cityedge/gateway.key", "a symbolic link") in [(e.field, e.raw)
                                                                for e in v.evidence]


def test_without_the_unit_the_service_checks_cannot_decide(root: Path) -> None:
    (root / "etc/systemd/system/cityedge-gateway.service").unlink()
    got = outcomes(root)
    for check in ("service-user", "service-hardening", "key-files"):
        assert got[check].outcome is Outcome.UNDECIDED
    assert "--unit" in got["service-user"].fix


def test_no_ssh_server_means_no_ssh_login(root: Path) -> None:
    for p in ("usr/sbin/sshd", "etc/ssh/sshd_config.d/50-cityedge.conf",
              "etc/ssh/sshd_config"):
        (root / p).unlink()
    got = outcomes(root)
    assert got["ssh-password"].outcome is Outcome.PASS
    assert got["ssh-password"].reason == "no SSH server is installed"


def test_unreadable_shadow_cannot_decide_unless_passwd_already_fails() -> None:
    cap = HostCapture(passwd="root:x:0:0::/root:/bin/sh\npi:x:1000:1000::/:/bin/sh\n",
                      shadow=None, errors=["/etc/shadow: Permission denied"])
    v = check_accounts(cap)
    assert v.outcome is Outcome.UNDECIDED
    assert "sudo" in v.fix
    cap.passwd = "root:x:0:0::/root:/bin/sh\nguest::1001:1001::/:/bin/sh\n"
    assert check_accounts(cap).outcome is Outcome.FAIL  # an empty field needs no shadow


def test_the_capture_keeps_no_password_hash_and_decides_the_same(root: Path,
                                                                 tmp_path: Path) -> None:
    cap = collect(root, reference_unit=UNIT)
    saved = tmp_path / "host.json"
    save_capture(cap, saved)
    text = saved.read_text()
    assert "$6$" not in text and HASH not in text
    assert ["ops", "hash"] in json.loads(text)["shadow"]
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    again = load_capture(saved)
    assert [v.to_json() for v in check_host(again)] == [v.to_json() for v in check_host(cap)]


def test_a_capture_that_is_not_one_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "cityedge-host-capture/1", "sshd_installed": "yes"}))
    r = CliRunner().invoke(app, ["hw", "host", "--capture-json", str(bad)])
    assert r.exit_code == 1
    assert r.stderr.splitlines()[0].startswith("cityedge: ")
    assert "sshd_installed" in r.stderr


def test_the_reference_is_the_projects_unit_hardening_block() -> None:
    ref = reference_hardening(UNIT.read_text())
    assert reference_unit_path() == UNIT
    assert {"NoNewPrivileges", "ProtectSystem", "UMask", "RestrictAddressFamilies",
            "MemoryDenyWriteExecute"} <= set(ref)
    assert not {"User", "ExecStart", "Restart"} & set(ref)  # running, not hardening
    for key, value in ref.items():  # the project's unit meets itself
        assert at_least(key, value, value), key


@pytest.mark.parametrize(("key", "host", "ref", "ok"), [
    ("ProtectSystem", "strict", "full", True),
    ("ProtectSystem", "full", "strict", False),
    ("NoNewPrivileges", "yes", "true", True),
    ("NoNewPrivileges", "no", "true", False),
    ("UMask", "0077", "0077", True),
    ("UMask", "0022", "0077", False),
    ("RestrictAddressFamilies", "AF_UNIX", "AF_INET AF_UNIX", True),
    ("RestrictAddressFamilies", "AF_INET AF_PACKET", "AF_INET AF_UNIX", False),
    ("RestrictAddressFamilies", "", "AF_INET AF_UNIX", False),
    ("ReadWritePaths", "/var/lib/cityedge /", "/var/lib/cityedge /opt/cityedge", False),
    ("ProtectHome", "read-only", "yes", False),
    ("CapabilityBoundingSet", "", "", True),  # empty: no capability at all
    ("CapabilityBoundingSet", "CAP_NET_RAW", "", False),
    ("AmbientCapabilities", "", "CAP_NET_BIND_SERVICE", True),
    ("SystemCallFilter", "", "@system-service", False),  # empty: the filter is reset
])
def test_at_least_compares_strictness(key: str, host: str, ref: str, ok: bool) -> None:
    assert at_least(key, host, ref) is ok


def test_cli_exit_codes_on_a_hardened_and_a_weakened_root(root: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "cityedge.cli", "hw", "host", "--root",
                           str(root), "--reference-unit", str(UNIT), "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert [v["outcome"] for v in json.loads(good.stdout)["verdicts"]] == ["pass"] * 7
    (root / "etc/cityedge/gateway.key").chmod(0o644)
    bad = CliRunner().invoke(app, ["hw", "host", "--root", str(root), "--reference-unit",
                                   str(UNIT)])
    assert bad.exit_code == 1
    assert "FAIL             CE-DATA-05 key-files" in bad.stdout
    assert "cityedge: 1 of 7 host checks" in bad.stderr
    tools = CliRunner().invoke(app, ["hw", "host", "--root", str(root), "--run-tools"])
    assert tools.exit_code == 1 and "--run-tools asks the running system" in tools.stderr


def test_every_host_verdict_names_a_requirement_the_host_audit_decides(root: Path) -> None:
    from cityedge_hardware.catalogue import load_catalogue

    by_id = {r.id: r for r in load_catalogue().requirements}
    for v in outcomes(root).values():
        assert "rpi-host-audit" in by_id[v.requirement].probes, v.requirement
        assert "rpi-gateway" in by_id[v.requirement].platforms


def test_sshd_t_and_systemctl_show_take_precedence_over_the_files(root: Path) -> None:
    cap = collect(root, reference_unit=UNIT)
    # what the running tools print (OpenSSH 9.2's `sshd -T` spelling, systemd 252's show)
    cap.sshd_t = ("port 22\nusepam yes\npermitrootlogin without-password\n"
                  "passwordauthentication yes\nkbdinteractiveauthentication no\n")
    cap.systemctl_show = "\n".join([
        "Id=cityedge-gateway.service", "LoadState=loaded", "User=cityedge",
        "NoNewPrivileges=no", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/cityedge /opt/cityedge", "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes", "ProtectControlGroups=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces=yes",
        "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native", "UMask=0077", "CapabilityBoundingSet=",
        "AmbientCapabilities=", "ProtectClock=yes", "ProtectHostname=yes",
        "ProtectKernelLogs=yes", "ProtectProc=invisible", "ProcSubset=pid",
        "RestrictRealtime=yes", "RestrictSUIDSGID=yes", "RemoveIPC=yes",
        "KeyringMode=private", "PrivateMounts=yes"])
    got = {v.check: v for v in check_host(cap)}
    assert got["ssh-password"].outcome is Outcome.FAIL
    assert got["ssh-password"].reason == "SSH accepts passwords (sshd -T)"
    assert got["ssh-root-login"].outcome is Outcome.FAIL
    assert got["service-hardening"].outcome is Outcome.FAIL
    assert [(e.field, e.raw) for e in got["service-hardening"].evidence] == [
        ("NoNewPrivileges", "no")]
    assert got["service-user"].outcome is Outcome.PASS
    cap.systemctl_show = "Id=cityedge-gateway.service\nLoadState=not-found\n"
    got = {v.check: v for v in check_host(cap)}  # not loaded: the files decide
    assert got["service-hardening"].outcome is Outcome.PASS


def test_a_key_owned_by_another_user_fails(root: Path) -> None:
    cap = collect(root, reference_unit=UNIT)
    cap.key_files = [dataclasses.replace(k, uid=1000) if k.path.endswith("gateway.key")
                     else k for k in cap.key_files]  # as `chown pi` would leave it
    v = {v.check: v for v in check_host(cap)}["key-files"]
    assert v.outcome is Outcome.FAIL
    assert ("/etc/cityedge/gateway.key", "owner pi") in [(e.field, e.raw) for e in v.evidence]
