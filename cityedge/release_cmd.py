"""``cityedge release``: the release manager's and the root holders' commands.

They run where the keys live (a root holder's offline laptop, the release manager's
signing host), never on the fleet server: the fleet only carries what they make. The
rules are the core's (``cityedge_core.release_keys``, ``update_manifest``); the files and
the guide: ``docs/RELEASE_MANAGER.md``.

- ``root-keygen --out DIR`` / ``keygen --out DIR``: one root key (per holder) / a release
  key; private file mode 0600, only kid and public point printed;
- ``root-set --root-pub A.pub ... --threshold k --out root-set.json``: the devices' anchor;
- ``certify`` / ``cosign`` / ``show``: the root-signed release-key list;
- ``sign``: a release manifest for an artifact; ``verify``: a release checked as a device
  checks it (exit 0 accepted, 1 refused);
- ``pack-gateway``: the gateway's artifact (a tar of the wheel set).
"""

from __future__ import annotations

import calendar
import re
import time
from pathlib import Path
from typing import Annotated

import typer

from cityedge_core import cose, release_keys, update_manifest
from cityedge_host import release
from cityedge_host.crypto import load_signer
from cityedge_host.errors import EXIT_USER_ERROR, UserError
from cityedge_host.files import write_atomic

release_app = typer.Typer(help="Release keys, signed update manifests (release manager).",
                          no_args_is_help=True)

_COMPONENTS = "|".join(release_keys.ROLES)


def parse_time(text: str, now: int | None = None) -> int:
    """UNIX seconds from ``2027-01-31``, ``2027-01-31T12:00:00Z`` (UTC), ``+30d`` /
    ``+12h`` / ``+90m`` (from now) or a plain number of UNIX seconds."""
    now = int(time.time()) if now is None else now
    t = text.strip()
    rel = re.fullmatch(r"\+(\d{1,6})([dhm])", t)
    if rel:
        return now + int(rel.group(1)) * {"d": 86400, "h": 3600, "m": 60}[rel.group(2)]
    if t.isdigit():
        return int(t)
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%MZ"):
        try:
            return calendar.timegm(time.strptime(t, fmt))
        except ValueError:
            continue
    raise UserError("%r is not a time" % text,
                    "give a UTC date (2027-01-31), date and time (2027-01-31T12:00:00Z), "
                    "+30d / +12h from now, or UNIX seconds")


def parse_window(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` (UTC) as minutes of the day."""
    m = re.fullmatch(r"(\d\d):(\d\d)-(\d\d):(\d\d)", text.strip())
    if m:
        h1, m1, h2, m2 = (int(x) for x in m.groups())
        if h1 < 24 and h2 < 24 and m1 < 60 and m2 < 60 and (h1, m1) != (h2, m2):
            return h1 * 60 + m1, h2 * 60 + m2
    raise UserError("install window %r is not HH:MM-HH:MM" % text,
                    "give UTC times, e.g. --window 01:00-05:00 (22:00-04:00 wraps midnight)")


def _release_key_arg(text: str) -> tuple[Path, list[str]]:
    """``FILE`` or ``FILE:role[,role]``."""
    path, sep, roles = text.rpartition(":")
    if sep and roles and all(r in release_keys.ROLES for r in roles.split(",")):
        return Path(path), roles.split(",")
    return Path(text), list(release_keys.ROLES)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError("cannot read the %s %s: %s" % (what, path, e.strerror)) from e


def _keygen(out: Path, kind: str) -> None:
    signer, key, pub = release.keygen(out, kind)
    where = "keep it offline" if kind == "root" else "keep it on the signing host"
    print("%s key %s: private %s (mode 0600; %s), public %s" % (
        kind, signer.kid.hex(), key, where, pub))


@release_app.command("root-keygen")
def root_keygen_command(
    out: Annotated[Path, typer.Option(help="Directory for the key files.")],
) -> None:
    """Make one root key (one per holder; run it on the holder's offline machine)."""
    _keygen(out, "root")


@release_app.command("keygen")
def keygen_command(
    out: Annotated[Path, typer.Option(help="Directory for the key files.")],
) -> None:
    """Make a release key (on the signing host); the root holders then certify it."""
    _keygen(out, "release")


@release_app.command("root-set")
def root_set_command(
    root_pub: Annotated[list[Path], typer.Option("--root-pub", help="A root's .pub file.")],
    threshold: Annotated[int, typer.Option(help="Root signatures a key list needs.")],
    out: Annotated[Path, typer.Option(help="The root set file to write.")],
) -> None:
    """Write the root set devices trust (built into the firmware and the gateway)."""
    rs = release.RootSet(threshold, [release.read_point(p) for p in root_pub])
    write_atomic(out, rs.to_json(), 0o644)
    print("root set: %d of %s -> %s" % (threshold, ", ".join(k.hex() for k in rs.kids), out))


@release_app.command("certify")
def certify_command(
    trust: Annotated[Path, typer.Option(help="The root set (root-set.json).")],
    root_key: Annotated[list[Path], typer.Option("--root-key",
                                                 help="A root's private key file.")],
    release_key_pub: Annotated[list[str], typer.Option(
        "--release-key-pub",
        help="A release key's .pub file, optionally :role[,role] (default: every role).")],
    key_expires: Annotated[str, typer.Option(
        help="When the release keys expire (2027-12-31, +365d).")],
    version: Annotated[int, typer.Option(help="The list's version (above the last).")],
    out: Annotated[Path, typer.Option(help="The list file to write.")],
    threshold: Annotated[int | None, typer.Option(
        help="Root signatures required (default and minimum: the root set's).")] = None,
) -> None:
    """Sign a new release-key list with the root keys given (others may cosign)."""
    roots = release.RootSet.load(trust)
    expires = parse_time(key_expires)
    keys = []
    for arg in release_key_pub:
        path, roles = _release_key_arg(arg)
        keys.append(release.CertifiedKey(release.read_point(path), roles, expires))
    data = release.certify(roots, [load_signer(p) for p in root_key], keys, version,
                           threshold)
    write_atomic(out, data, 0o644)
    for line in release.describe_list(data):
        print(line)
    print("written to %s" % out)


@release_app.command("cosign")
def cosign_command(
    trust: Annotated[Path, typer.Option(help="The root set (root-set.json).")],
    root_key: Annotated[Path, typer.Option(help="Your root's private key file.")],
    keys: Annotated[Path, typer.Option(help="The release-key list to sign.")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default: in place).")]
    = None,
) -> None:
    """Add your root signature to a release-key list (read `show` first)."""
    roots = release.RootSet.load(trust)
    data = release.cosign(_read(keys, "key list"), load_signer(root_key), roots)
    write_atomic(out or keys, data, 0o644)
    for line in release.describe_list(data):
        print(line)


@release_app.command("show")
def show_command(
    keys: Annotated[Path, typer.Option(help="A release-key list.")],
) -> None:
    """Print what a release-key list says and who signed it (nothing verified)."""
    for line in release.describe_list(_read(keys, "key list")):
        print(line)


@release_app.command("sign")
def sign_command(
    key: Annotated[Path, typer.Option(help="The release key's private key file.")],
    artifact: Annotated[Path, typer.Option(
        help="build/firmware.romfs (device-firmware) or the tar of pack-gateway.")],
    component: Annotated[str, typer.Option(help=_COMPONENTS)],
    version: Annotated[str, typer.Option(help="The release's version, e.g. 1.4.0.")],
    sequence: Annotated[int, typer.Option(help="Above every earlier release's.")],
    hw_class: Annotated[list[str], typer.Option("--hw-class",
                                                help="A hardware class it fits.")],
    expires: Annotated[str, typer.Option(help="When it is void (+14d, 2027-01-31).")],
    out: Annotated[Path, typer.Option(help="The manifest file to write.")],
    min_version: Annotated[str | None, typer.Option(
        help="Oldest installed version it applies to.")] = None,
    window: Annotated[list[str] | None, typer.Option(
        "--window", help="UTC install window HH:MM-HH:MM (repeatable).")] = None,
) -> None:
    """Sign a release manifest for an artifact."""
    if component not in release_keys.ROLES:
        raise UserError("unknown component %r" % component, "give one of " + _COMPONENTS)
    windows = [parse_window(w) for w in window] if window else None
    data = release.sign_release(load_signer(key), artifact, component, version, sequence,
                                hw_class, parse_time(expires), min_version, windows)
    write_atomic(out, data, 0o644)
    m = update_manifest.decode_payload(cose.decode_sign1(data).payload)
    print("manifest: %s %s, sequence %d, for %s, %d bytes, SHA-256 %s -> %s" % (
        m.component, m.version, m.sequence, ",".join(m.hw_classes), m.size,
        m.sha256.hex(), out))


@release_app.command("verify")
def verify_command(
    trust: Annotated[Path, typer.Option(help="The root set (root-set.json).")],
    keys: Annotated[Path, typer.Option(help="The release-key list.")],
    manifest: Annotated[Path, typer.Option(help="The manifest.")],
    artifact: Annotated[Path | None, typer.Option(help="The artifact.")] = None,
    hw_class: Annotated[str | None, typer.Option(help="Check for this class.")] = None,
    installed_sequence: Annotated[int, typer.Option(
        help="The sequence installed on the device.")] = 0,
    installed_version: Annotated[str | None, typer.Option(
        help="The version installed on the device.")] = None,
    keys_version: Annotated[int, typer.Option(
        help="The key-list version the device holds.")] = 0,
    flash_budget: Annotated[int | None, typer.Option(help="Bytes the device has.")] = None,
    at: Annotated[str | None, typer.Option(help="Check at this time (default: now).")]
    = None,
) -> None:
    """Check a release as a device would; exit 0 if it is accepted, 1 if refused."""
    report = release.verify_release(
        release.RootSet.load(trust), _read(keys, "key list"), _read(manifest, "manifest"),
        artifact, None, hw_class, installed_sequence, installed_version, keys_version,
        parse_time(at) if at is not None else None, flash_budget)
    for line in report.lines:
        print(line)
    if not report.ok:
        raise typer.Exit(EXIT_USER_ERROR)
    print("accepted")


@release_app.command("pack-gateway")
def pack_gateway_command(
    wheels: Annotated[Path, typer.Option(help="Directory of the wheel set "
                                              "(pip wheel --wheel-dir DIR .).")],
    out: Annotated[Path, typer.Option(help="The tar to write (the gateway artifact).")],
) -> None:
    """Pack a wheel set into the gateway's artifact (same wheels, same bytes)."""
    names = release.pack_wheels(wheels, out)
    size, digest = release.hash_file(out)
    print("gateway artifact: %d wheels, %d bytes, SHA-256 %s -> %s" % (
        len(names), size, digest.hex(), out))
