"""``cityedge release`` on real files, and the attacks on a release it must refuse.

Each attack is made the way an attacker would make it (with our own tools where they
help: a stolen key signs with ``cityedge release sign`` as well as with anything else) and
checked with ``cityedge release verify`` (exit 1 and the core's reason code; the command
runs in this process through Click's runner, the same ``cityedge`` app and error
handling, one real process proves the exit code: ``test_a_good_release_is_accepted``,
``test_a_rollback_to_an_older_sequence_is_refused``), which runs
the device's rules (``cityedge_core.update_manifest.check_update``) and streams the
artifact through the device's ``ArtifactHasher``. The same rules on the device's
interpreter: tests/shared/test_release_shared.py; the full table of verdicts:
tests/core/test_release_properties.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityedge.cli import app
from cityedge_core import cbor, command, command_gate, cose, release_keys, update_manifest
from cityedge_fleet import command_key
from cityedge_host import release
from cityedge_host.crypto import EcSigner, load_signer, public_sec1

NOW = 1_800_000_000  # every check runs --at this time: no test depends on the clock
EXPIRES = NOW + 14 * 86400
DEVICE = "urn:dev:mac:0024befffe804ff1"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str | Path, process: bool = False) -> Run:
    """``cityedge release ARGS``: in this process (fast), or as a real process."""
    argv = ["release", *map(str, args)]
    if process:
        p = subprocess.run([sys.executable, "-m", "cityedge.cli", *argv],
                           capture_output=True, text=True, timeout=60)
        assert "Traceback" not in p.stderr, p.stderr
        return Run(p.returncode, p.stdout, p.stderr)
    r = CliRunner().invoke(app, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return Run(r.exit_code, r.stdout, r.stderr)


@dataclass
class World:
    """A release made by the release manager: three root holders (2 of 3), a release key
    certified in list version 1, a firmware image and its manifest (sequence 5)."""

    dir: Path
    roots: list[EcSigner]
    root_keys: list[Path]
    trust: Path
    release: EcSigner
    release_key: Path
    keys_v1: Path
    artifact: Path
    manifest: Path

    def verify(self, *extra: str | Path, manifest: Path | None = None,
               keys: Path | None = None, artifact: Path | None = None,
               process: bool = False) -> Run:
        return cli("verify", "--trust", self.trust, "--keys", keys or self.keys_v1,
                   "--manifest", manifest or self.manifest,
                   "--artifact", artifact or self.artifact, "--at", str(NOW),
                   "--hw-class", "esp32-s3", "--installed-sequence", "4", *extra,
                   process=process)


def refused(r: Run, reason: str) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REFUSED %s:" % reason in r.stdout, r.stdout
    assert "accepted" not in r.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    d = tmp_path_factory.mktemp("release")
    roots = [EcSigner.generate() for _ in range(3)]
    root_keys = []
    for i, r in enumerate(roots):
        root_keys.append(d / ("root%d.key" % i))
        r.save(root_keys[-1])
    rs = release.RootSet(2, [public_sec1(r.public_key) for r in roots])
    trust = d / "root-set.json"
    trust.write_bytes(rs.to_json())
    rel = EcSigner.generate()
    rel_key = d / "release.key"
    rel.save(rel_key)
    keys_v1 = d / "release-keys-v1.cose"
    keys_v1.write_bytes(release.certify(rs, roots[:2], [release.CertifiedKey(
        public_sec1(rel.public_key), ["device-firmware"], NOW + 365 * 86400)], 1))
    artifact = d / "firmware.romfs"
    artifact.write_bytes(os.urandom(64 * 1024))
    manifest = d / "manifest.cose"
    manifest.write_bytes(release.sign_release(rel, artifact, "device-firmware", "1.2.0", 5,
                                              ["esp32-s3", "esp32"], EXPIRES))
    return World(d, roots, root_keys, trust, rel, rel_key, keys_v1, artifact, manifest)


def test_the_release_managers_path_from_keygen_to_verify(tmp_path: Path) -> None:
    out = []
    for holder in ("h1", "h2", "h3"):
        out.append(cli("root-keygen", "--out", tmp_path / holder))
    out.append(cli("keygen", "--out", tmp_path / "signing"))
    assert all(r.returncode == 0 for r in out), [r.stderr for r in out]
    keys = sorted(tmp_path.glob("*/*.key"))
    pubs = sorted(tmp_path.glob("h*/*.pub"))
    assert len(keys) == 4 and len(pubs) == 3
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    rel_pub = next((tmp_path / "signing").glob("*.pub"))
    trust = tmp_path / "root-set.json"
    args = [x for p in pubs for x in ("--root-pub", p)]
    out.append(cli("root-set", *args, "--threshold", "2", "--out", trust))
    h1, h2, _h3 = (next((tmp_path / h).glob("*.key")) for h in ("h1", "h2", "h3"))
    lst = tmp_path / "release-keys.cose"
    out.append(cli("certify", "--trust", trust, "--root-key", h1, "--release-key-pub",
                   "%s:device-firmware" % rel_pub, "--key-expires", str(NOW + 86400 * 365),
                   "--version", "1", "--out", lst))
    assert out[-1].returncode == 0, out[-1].stderr
    assert "signed by %s" % h1.name[5:21] in out[-1].stdout
    art = tmp_path / "firmware.romfs"
    art.write_bytes(b"\x00romfs" * 999)
    m = tmp_path / "manifest.cose"
    out.append(cli("sign", "--key", next((tmp_path / "signing").glob("*.key")), "--artifact",
                   art, "--component", "device-firmware", "--version", "1.0.0",
                   "--sequence", "1", "--hw-class", "esp32-s3", "--expires", str(EXPIRES),
                   "--window", "01:00-05:00", "--out", m))
    assert out[-1].returncode == 0, out[-1].stderr
    check = ("verify", "--trust", trust, "--keys", lst, "--manifest", m, "--artifact", art,
             "--hw-class", "esp32-s3", "--at", "%d" % (NOW - NOW % 86400 + 2 * 3600))
    refused(cli(*check), "keys_threshold")  # one holder has signed: 1 of 2
    out.append(cli("cosign", "--trust", trust, "--root-key", h2, "--keys", lst))
    assert out[-1].returncode == 0, out[-1].stderr
    ok = cli(*check)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("accepted"), ok.stdout
    assert "signed by 2 of 3 roots" in ok.stdout and "artifact: 5994 bytes" in ok.stdout
    # the install window is the manifest's: at 06:00 UTC the same release waits
    late = cli(*check[:-1], "%d" % (NOW - NOW % 86400 + 6 * 3600))
    assert late.returncode == 1 and "NOT NOW outside_window" in late.stdout, late.stdout
    # no private key is ever printed
    printed = "".join(r.stdout + r.stderr for r in out).replace("\n", "")
    for k in keys:
        body = "".join(k.read_text().splitlines()[1:-1])  # the PEM's base64, key-specific
        secret = load_signer(k)._key.private_numbers().private_value.to_bytes(32, "big")
        assert body[-40:] not in printed and secret.hex() not in printed


def test_a_good_release_is_accepted(world: World) -> None:
    r = world.verify(process=True)
    assert r.returncode == 0 and "accepted" in r.stdout, r.stdout + r.stderr


def test_a_rollback_to_an_older_sequence_is_refused(world: World) -> None:
    refused(world.verify("--installed-sequence", "6", process=True), "rollback")


def test_a_replayed_manifest_is_refused(world: World) -> None:
    refused(world.verify("--installed-sequence", "5"), "replay")


def test_a_frozen_manifest_is_refused_once_expired(world: World) -> None:
    r = cli("verify", "--trust", world.trust, "--keys", world.keys_v1, "--manifest",
            world.manifest, "--artifact", world.artifact, "--hw-class", "esp32-s3",
            "--installed-sequence", "4", "--at", str(EXPIRES))
    refused(r, "expired")


def test_a_manifest_for_another_hardware_class_is_refused(world: World) -> None:
    r = cli("verify", "--trust", world.trust, "--keys", world.keys_v1, "--manifest",
            world.manifest, "--artifact", world.artifact, "--hw-class", "rp2-pico-w",
            "--at", str(NOW))
    refused(r, "wrong_hw_class")


def test_a_tampered_artifact_is_refused(world: World, tmp_path: Path) -> None:
    bad = bytearray(world.artifact.read_bytes())
    bad[1234] ^= 0x20
    tampered = tmp_path / "tampered.romfs"
    tampered.write_bytes(bad)
    refused(world.verify(artifact=tampered), "artifact_digest")
    short = tmp_path / "short.romfs"
    short.write_bytes(bad[:-1])
    refused(world.verify(artifact=short), "artifact_short")


def test_an_artifact_longer_than_the_manifest_says_is_refused(world: World,
                                                              tmp_path: Path) -> None:
    longer = tmp_path / "longer.romfs"
    longer.write_bytes(world.artifact.read_bytes() + b"\x00" * 10)
    refused(world.verify(artifact=longer), "artifact_too_long")
    # endless data: a source that never ends is read only up to the manifest's size
    m = update_manifest.decode_payload(cose.decode_sign1(world.manifest.read_bytes()).payload)
    hasher = update_manifest.ArtifactHasher(m.size, m.sha256)
    taken = 0
    with pytest.raises(update_manifest.Refused) as e:
        while True:  # the download loop of a device: 4 KiB blocks
            hasher.feed(b"\xff" * 4096)
            taken += 4096
    assert e.value.reason == "artifact_too_long" and taken <= m.size


def test_a_manifest_signed_by_a_revoked_release_key_is_refused(world: World,
                                                               tmp_path: Path) -> None:
    # the root holders revoke the release key: list version 2 certifies its successor only
    new_dir = tmp_path / "new"
    assert cli("keygen", "--out", new_dir).returncode == 0
    new_pub = next(new_dir.glob("*.pub"))
    keys_v2 = tmp_path / "release-keys-v2.cose"
    r = cli("certify", "--trust", world.trust, "--root-key", world.root_keys[0],
            "--root-key", world.root_keys[2], "--release-key-pub", new_pub,
            "--key-expires", str(NOW + 86400), "--version", "2", "--out", keys_v2)
    assert r.returncode == 0, r.stderr
    refused(world.verify(keys=keys_v2), "unknown_key")
    # the device took list 2: the old list, which still names the revoked key, is refused
    refused(world.verify("--keys-version", "2"), "keys_rollback")
    # and the successor signs releases that are accepted
    new_manifest = tmp_path / "m2.cose"
    r = cli("sign", "--key", next(new_dir.glob("*.key")), "--artifact", world.artifact,
            "--component", "device-firmware", "--version", "1.2.1", "--sequence", "6",
            "--hw-class", "esp32-s3", "--expires", str(EXPIRES), "--out", new_manifest)
    assert r.returncode == 0, r.stderr
    ok = world.verify("--keys-version", "2", "--installed-sequence", "5", keys=keys_v2,
                      manifest=new_manifest)
    assert ok.returncode == 0, ok.stdout


def test_a_manifest_signed_by_an_unknown_key_is_refused(world: World, tmp_path: Path) -> None:
    stranger = EcSigner.generate()
    forged = tmp_path / "forged.cose"
    forged.write_bytes(release.sign_release(stranger, world.artifact, "device-firmware",
                                            "9.9.9", 99, ["esp32-s3"], EXPIRES))
    refused(world.verify(manifest=forged), "unknown_key")
    # the stranger names the real release key's kid: the signature does not verify
    m = update_manifest.Manifest("device-firmware", "9.9.9", 99, ["esp32-s3"],
                                 *release.hash_file(world.artifact), EXPIRES)
    forged.write_bytes(update_manifest.sign_manifest(m, stranger, world.release.kid))
    refused(world.verify(manifest=forged), "bad_signature")


def test_a_key_list_not_signed_by_the_threshold_is_refused(world: World,
                                                           tmp_path: Path) -> None:
    rs = release.RootSet.load(world.trust)
    stranger = EcSigner.generate()
    entry = [release.CertifiedKey(public_sec1(stranger.public_key), ["device-firmware"],
                                  NOW + 86400)]
    lists = {
        # one holder alone
        "one.cose": release.certify(rs, world.roots[:1], entry, 2),
        # one holder, claiming a threshold of 1 for this list
        "k1.cose": release.certify(release.RootSet(1, rs.points), world.roots[:1], entry, 2,
                                   threshold=1),
        # one holder, and its signature again under a kid no root has
        "twice.cose": release_keys.add_signature(
            release.certify(rs, world.roots[:1], entry, 2), world.roots[0],
            b"\x00" * 8),
        # a genuine list of two holders whose payload was swapped for the stranger's
        "swapped.cose": _swap(world.keys_v1.read_bytes(),
                              release.certify(rs, world.roots[:1], entry, 2)),
    }
    forged = tmp_path / "forged.cose"
    forged.write_bytes(release.sign_release(stranger, world.artifact, "device-firmware",
                                            "9.9.9", 99, ["esp32-s3"], EXPIRES))
    for name, data in lists.items():
        (tmp_path / name).write_bytes(data)
        refused(world.verify(keys=tmp_path / name, manifest=forged), "keys_threshold")
    # a key that is not a root cannot add its signature with the tool either
    r = cli("cosign", "--trust", world.trust, "--root-key", world.release_key, "--keys",
            tmp_path / "one.cose")
    assert r.returncode == 1 and "is not a root" in r.stderr, r.stderr


def _swap(genuine: bytes, other: bytes) -> bytes:
    g = cbor.loads(genuine)
    g.value[2] = cbor.loads(other).value[2]
    return cbor.dumps(g)


class _State(dict[str, int]):
    def set(self, **kw: int) -> None:
        self.update(kw)


def test_a_fleet_with_a_stolen_command_key_cannot_release(world: World,
                                                          tmp_path: Path) -> None:
    # the fleet's command key, made the way the fleet makes it; devices trust it...
    key_file = tmp_path / "fleet" / "command.key"
    fleet = command_key.create(key_file)
    gate = command_gate.CommandGate(DEVICE, {fleet.kid: fleet.verifier()}, _State(),
                                    lambda: NOW)
    cmd = command.encode_command(fleet, fleet.kid, "status", DEVICE, 1, NOW + 60)
    assert gate.check(cmd)[0] == "status"
    # ...for commands. Stolen, it signs a release with the release tool: refused
    stolen = tmp_path / "stolen.cose"
    r = cli("sign", "--key", key_file, "--artifact", world.artifact, "--component",
            "device-firmware", "--version", "6.6.6", "--sequence", "666", "--hw-class",
            "esp32-s3", "--expires", str(EXPIRES), "--out", stolen)
    assert r.returncode == 0, r.stderr
    refused(world.verify(manifest=stolen), "unknown_key")
    # nor can it certify itself as a release key, with the tool or by hand
    fleet_pub = tmp_path / "fleet.pub"
    fleet_pub.write_text(public_sec1(fleet.public_key).hex())
    r = cli("certify", "--trust", world.trust, "--root-key", key_file, "--release-key-pub",
            fleet_pub, "--key-expires", "+1d", "--version", "9", "--out",
            tmp_path / "self.cose")
    assert r.returncode == 1 and "is not a root" in r.stderr, r.stderr
    assert not (tmp_path / "self.cose").exists()
    payload = cbor.dumps(release_keys.payload_map(
        9, 2, release.RootSet.load(world.trust).kids,
        [(public_sec1(fleet.public_key), ["device-firmware"], EXPIRES)]))
    prot = release_keys.sign_protected(fleet.kid)
    self_signed = tmp_path / "self.cose"
    self_signed.write_bytes(release_keys.encode_list(payload, [
        (prot, fleet.sign(release_keys.signature_structure(b"", prot, payload)))]))
    refused(world.verify(keys=self_signed, manifest=stolen), "keys_threshold")


def test_the_gateway_artifact_is_the_wheel_set_in_reproducible_bytes(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "cityedge-0.1.0-py3-none-any.whl").write_bytes(b"PK ours")
    (wheels / "cbor2-5.9.0-cp311-cp311-linux_aarch64.whl").write_bytes(b"PK theirs")
    (wheels / "notes.txt").write_text("not a wheel")
    r = cli("pack-gateway", "--wheels", wheels, "--out", tmp_path / "a.tar")
    assert r.returncode == 0 and "2 wheels" in r.stdout, r.stdout + r.stderr
    os.utime(wheels / "cbor2-5.9.0-cp311-cp311-linux_aarch64.whl", (1, 1))
    release.pack_wheels(wheels, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == ["cbor2-5.9.0-cp311-cp311-linux_aarch64.whl",
                                  "cityedge-0.1.0-py3-none-any.whl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("pack-gateway", "--wheels", empty, "--out", tmp_path / "c.tar")
    assert r.returncode == 1 and "pip wheel" in r.stderr, r.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("2027-01-31", 1801353600), ("2027-01-31T12:00:00Z", 1801396800),
    ("+2d", NOW + 2 * 86400), ("+90m", NOW + 5400), ("1801267200", 1801267200)])
def test_times_the_tools_read(text: str, expected: int) -> None:
    from cityedge.release_cmd import parse_time

    assert parse_time(text, NOW) == expected


def test_bad_times_and_windows_are_user_errors(world: World, tmp_path: Path) -> None:
    r = cli("sign", "--key", world.release_key, "--artifact", world.artifact, "--component",
            "device-firmware", "--version", "1.0", "--sequence", "7", "--hw-class", "x",
            "--expires", "next tuesday", "--out", tmp_path / "m.cose")
    assert r.returncode == 1 and "what to do:" in r.stderr, r.stderr
    r = cli("sign", "--key", world.release_key, "--artifact", world.artifact, "--component",
            "device-firmware", "--version", "1.0", "--sequence", "7", "--hw-class", "x",
            "--expires", "+1d", "--window", "25:00-01:00", "--out", tmp_path / "m.cose")
    assert r.returncode == 1 and "HH:MM-HH:MM" in r.stderr, r.stderr
    r = cli("sign", "--key", world.release_key, "--artifact", world.artifact, "--component",
            "device-firmware", "--version", "v1", "--sequence", "7", "--hw-class", "x",
            "--expires", "+1d", "--out", tmp_path / "m.cose")
    assert r.returncode == 1 and "would be refused" in r.stderr, r.stderr
    assert not (tmp_path / "m.cose").exists()
