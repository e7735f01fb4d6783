"""The firmware-image probe (``cityedge hw image``) on the project's own ``make firmware``
output, signed with test release keys in the project's OTA release format: it passes, and
each attack or slip (a changed image or module, an unsigned or wrongly signed manifest, an
old sequence, a planted secret, a boot.py that keeps the REPL) fails for its own reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpremote.romfs import VfsRomWriter
from typer.testing import CliRunner

from cityedge.build_firmware import build
from cityedge.cli import app
from cityedge_core import cose, update_manifest
from cityedge_hardware.image_probe import capture, probe_image
from cityedge_hardware.image_rules import (
    RomfsError,
    boot_calls,
    check_boot,
    romfs_files,
)
from cityedge_hardware.verdict import Outcome, Verdict
from cityedge_host import release
from cityedge_host.crypto import EcSigner, public_sec1
from cityedge_host.production_boot import BOOT_PY

NOW = 1_800_000_000  # every check is judged at this time: no test depends on the clock
EXPIRES = NOW + 14 * 86400
SEQUENCE = 5


@dataclass
class Signed:
    """A build directory (``firmware/`` and ``firmware.romfs``) and its release files."""

    build: Path
    root: EcSigner
    release_key: EcSigner
    trust: Path
    keys: Path
    manifest: Path


def _sign(signer: EcSigner, artifact: Path, out: Path, sequence: int = SEQUENCE) -> Path:
    out.write_bytes(release.sign_release(signer, artifact, "device-firmware", "1.0.0",
                                         sequence, ["esp32"], EXPIRES))
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    d = tmp_path_factory.mktemp("image")
    build(d / "build" / "firmware")  # what `make firmware` writes: build/firmware{,.romfs}
    root, rel = EcSigner.generate(), EcSigner.generate()
    roots = release.RootSet(1, [public_sec1(root.public_key)])
    trust = d / "root-set.json"
    trust.write_bytes(roots.to_json())
    keys = d / "release-keys.cose"
    keys.write_bytes(release.certify(roots, [root], [release.CertifiedKey(
        public_sec1(rel.public_key), ["device-firmware"], NOW + 365 * 86400)], 1))
    manifest = _sign(rel, d / "build" / "firmware.romfs", d / "manifest.cose")
    return Signed(d / "build", root, rel, trust, keys, manifest)


@pytest.fixture
def bundle(signed: Signed, tmp_path: Path) -> Path:
    """A copy of the signed build to change."""
    return Path(shutil.copytree(signed.build, tmp_path / "build"))


def _probe(signed: Signed, bundle: Path, manifest: Path | None = None,
           **kw: object) -> dict[str, Verdict]:
    args: dict[str, object] = {"manifest": manifest or signed.manifest,
                               "release_keys": signed.keys, "release_roots": [signed.trust],
                               "now": NOW}
    args.update(kw)
    verdicts = probe_image(bundle, **args)  # type: ignore[arg-type]
    assert len(verdicts) == 4
    return {v.check: v for v in verdicts}


def _outcomes(got: dict[str, Verdict]) -> dict[str, Outcome]:
    return {k: v.outcome for k, v in got.items()}


ALL_PASS = {"fw-signed": Outcome.PASS, "fw-sequence": Outcome.PASS,
            "fw-secrets": Outcome.PASS, "fw-repl": Outcome.PASS}


def test_the_projects_own_signed_build_passes(signed: Signed) -> None:
    got = _probe(signed, signed.build, min_sequence=SEQUENCE - 1)
    assert _outcomes(got) == ALL_PASS, {k: v.reason for k, v in got.items()}
    assert {v.requirement for v in got.values()} == {"CE-UPD-03", "CE-UPD-04", "CE-AUTH-06",
                                                      "CE-DBG-03"}
    ev = {e.field: e for e in got["fw-signed"].evidence}
    assert ev["artifact"].raw == "firmware.romfs"
    assert ev["firmware/boot.py"].raw == "outside the signed update"  # named, not hidden
    # every module of the tree was compared with the signed image, none is left over
    assert not any(f.endswith(".mpy") for f in ev)
    assert got["fw-repl"].evidence[0].raw == "detaches REPL slot 1"


def test_the_signed_romfs_alone_and_a_tar_of_the_build_are_read_alike(
        signed: Signed, tmp_path: Path) -> None:
    alone = _probe(signed, signed.build / "firmware.romfs")
    assert alone["fw-signed"].outcome is Outcome.PASS
    assert alone["fw-repl"].outcome is Outcome.FAIL  # the ROMFS holds no boot.py
    tar = tmp_path / "bundle.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(signed.build, arcname=".")
    assert _outcomes(_probe(signed, tar)) == ALL_PASS


def test_a_changed_image_fails_the_signature_check(signed: Signed, bundle: Path) -> None:
    image = bundle / "firmware.romfs"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x01
    image.write_bytes(bytes(data))
    got = _probe(signed, bundle)
    assert got["fw-signed"].outcome is Outcome.FAIL
    assert "no file of the bundle is the signed artifact" in got["fw-signed"].reason
    assert got["fw-sequence"].outcome is Outcome.PASS  # the manifest itself is fine


def test_a_changed_or_added_module_beside_the_signed_image_fails(signed: Signed,
                                                                 bundle: Path) -> None:
    module = bundle / "firmware" / "cityedge_fw" / "main.mpy"
    module.write_bytes(module.read_bytes() + b"\x00")
    (bundle / "firmware" / "cityedge_fw" / "backdoor.mpy").write_bytes(b"M\x06\x00\x1f")
    got = _probe(signed, bundle)
    assert got["fw-signed"].outcome is Outcome.FAIL
    ev = {e.field: e.raw for e in got["fw-signed"].evidence}
    assert ev["firmware/cityedge_fw/main.mpy"] == ("differs from cityedge_fw/main.mpy in "
                                                   "the signed image")
    assert ev["firmware/cityedge_fw/backdoor.mpy"] == "not in the signed image"


def test_an_unsigned_manifest_fails(signed: Signed, bundle: Path, tmp_path: Path) -> None:
    size, digest = release.hash_file(bundle / "firmware.romfs")
    payload = update_manifest.Manifest("device-firmware", "1.0.0", SEQUENCE, ["esp32"],
                                       size, digest, EXPIRES).encode()
    unsigned = tmp_path / "unsigned.cose"
    unsigned.write_bytes(payload)  # the manifest's fields, but no COSE signature
    got = _probe(signed, bundle, unsigned)
    assert got["fw-signed"].outcome is Outcome.FAIL
    assert "malformed" in got["fw-signed"].reason
    assert got["fw-sequence"].outcome is Outcome.UNDECIDED  # an unsigned number is nothing


def test_a_manifest_signed_by_an_uncertified_key_fails(signed: Signed, bundle: Path,
                                                       tmp_path: Path) -> None:
    rogue = _sign(EcSigner.generate(), bundle / "firmware.romfs", tmp_path / "rogue.cose")
    got = _probe(signed, bundle, rogue)
    assert got["fw-signed"].outcome is Outcome.FAIL
    assert "unknown_key" in got["fw-signed"].reason


def test_a_manifest_changed_after_signing_fails(signed: Signed, bundle: Path,
                                                tmp_path: Path) -> None:
    msg = cose.decode_sign1(signed.manifest.read_bytes())
    m = update_manifest.decode_payload(msg.payload)
    m.sequence = 20  # the attacker raises the sequence, keeping the signature
    forged = bytearray(signed.manifest.read_bytes())
    old, new = msg.payload, m.encode()
    assert len(old) == len(new)
    i = bytes(forged).index(old)
    forged[i:i + len(old)] = new
    (tmp_path / "forged.cose").write_bytes(bytes(forged))
    got = _probe(signed, bundle, tmp_path / "forged.cose")
    assert got["fw-signed"].outcome is Outcome.FAIL
    assert "bad_signature" in got["fw-signed"].reason


def test_a_root_set_the_city_did_not_name_fails(signed: Signed, bundle: Path,
                                                tmp_path: Path) -> None:
    city = release.RootSet(1, [public_sec1(EcSigner.generate().public_key)])
    (tmp_path / "city-roots.json").write_bytes(city.to_json())
    got = _probe(signed, bundle, release_roots=[tmp_path / "city-roots.json"])
    assert got["fw-signed"].outcome is Outcome.FAIL
    assert "keys_threshold" in got["fw-signed"].reason
    # naming the vendor's root set as well: the release verifies under one of them
    both = _probe(signed, bundle, release_roots=[tmp_path / "city-roots.json",
                                                 signed.trust])
    assert both["fw-signed"].outcome is Outcome.PASS


@pytest.mark.parametrize(("floor", "word"), [(SEQUENCE, "replay"), (SEQUENCE + 3, "rollback")])
def test_a_sequence_not_above_the_floor_fails(signed: Signed, floor: int, word: str) -> None:
    got = _probe(signed, signed.build, min_sequence=floor)
    assert got["fw-sequence"].outcome is Outcome.FAIL
    assert got["fw-sequence"].reason.endswith("(%s)" % word)
    assert got["fw-signed"].outcome is Outcome.PASS  # signed all right, only too old


def test_an_expired_manifest_fails_as_devices_refuse_it(signed: Signed) -> None:
    got = _probe(signed, signed.build, now=EXPIRES + 1)
    assert got["fw-signed"].outcome is Outcome.FAIL
    assert "expired" in got["fw-signed"].reason


def test_without_a_manifest_it_cannot_decide_and_says_what_to_supply(signed: Signed) -> None:
    verdicts = probe_image(signed.build)
    got = {v.check: v for v in verdicts}
    for check in ("fw-signed", "fw-sequence"):
        assert got[check].outcome is Outcome.UNDECIDED
        assert "--release manifest.cose" in got[check].fix
        assert "--release-root" in got[check].fix


def test_a_planted_secret_fails_only_the_secret_check(signed: Signed, bundle: Path) -> None:
    (bundle / "firmware" / "config.json").write_text(
        '{"wifi": {"ssid": "city", "password": "Sommer2026!x"}}')
    got = _probe(signed, bundle)
    assert got["fw-secrets"].outcome is Outcome.FAIL
    assert got["fw-secrets"].evidence[0].field == "firmware/config.json@39"
    assert "Sommer2026" not in json.dumps([v.to_json() for v in got.values()])
    assert got["fw-signed"].outcome is Outcome.PASS


DETACH = 'import os\nos.dupterm(None, 1)\n'
KEEPS = {
    "no detach": "import os\n",
    "commented out": "import os\n# os.dupterm(None, 1)\n",
    "in a string": 'import os\nx = "os.dupterm(None, 1)"\n',
    "detach then attach": DETACH + "import machine\nos.dupterm(machine.UART(0, 115200), 1)\n",
    "webrepl": DETACH + "import webrepl\nwebrepl.start()\n",
    "other platform only": 'import os, sys\nif sys.platform == "rp2":\n'
                           '    os.dupterm(None, 1)\n',
    "unknown condition": "import os, machine\nif machine.Pin(0).value():\n"
                         "    os.dupterm(None, 1)\n",
    "in a function never called": "import os\ndef f():\n    os.dupterm(None, 1)\n",
    "wrong slot": "import os\nos.dupterm(None, 0)\n",
    "does not parse": "import os\nos.dupterm(None, 1\n",
}


@pytest.mark.parametrize("case", sorted(KEEPS))
def test_a_boot_py_that_keeps_the_repl_fails(case: str) -> None:
    v = check_boot([("boot.py", KEEPS[case].encode())], "esp32")
    assert v.outcome is Outcome.FAIL, v
    assert v.requirement == "CE-DBG-03"


@pytest.mark.parametrize("source", [
    DETACH,
    BOOT_PY,
    'import os, sys\nif sys.platform != "rp2":\n    os.dupterm(None, 1)\nelse:\n    pass\n',
    "import uos\ntry:\n    uos.dupterm(None, 1)\nexcept OSError:\n    pass\n",
])
def test_a_boot_py_that_detaches_the_repl_passes(source: str) -> None:
    assert check_boot([("boot.py", source.encode())], "esp32").outcome is Outcome.PASS


def test_the_reference_is_what_make_firmware_writes() -> None:
    assert boot_calls(BOOT_PY.encode(), "esp32").detached == {1}
    v = check_boot([("boot.py", BOOT_PY.encode())], "rp2040")
    assert v.outcome is Outcome.UNDECIDED  # boot.py cannot detach the REPL on an RP2040
    assert "cityedge hw serial" in v.fix


def test_a_bundle_without_or_with_a_weakened_boot_py_fails(signed: Signed,
                                                           bundle: Path) -> None:
    boot = bundle / "firmware" / "boot.py"
    boot.write_text(KEEPS["commented out"])
    assert _probe(signed, bundle)["fw-repl"].outcome is Outcome.FAIL
    boot.unlink()
    got = _probe(signed, bundle)
    assert got["fw-repl"].outcome is Outcome.FAIL
    assert got["fw-repl"].reason == "the bundle has no boot.py: the REPL stays on the UART"


def test_the_romfs_reader_gives_back_the_built_tree(signed: Signed) -> None:
    inside = romfs_files((signed.build / "firmware.romfs").read_bytes())
    tree = {p.relative_to(signed.build / "firmware").as_posix(): p.read_bytes()
            for p in (signed.build / "firmware").rglob("*.mpy")}
    assert inside == tree and len(tree) > 20


_NAMES = st.text("abcdefghij_.0123456789", min_size=1, max_size=8).filter(
    lambda n: n not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_NAMES, st.one_of(st.binary(max_size=300), st.dictionaries(
    _NAMES, st.binary(max_size=100), max_size=4)), max_size=6))
def test_romfs_reader_round_trips_mpremotes_writer(tree: dict[str, object]) -> None:
    w = VfsRomWriter()
    want: dict[str, bytes] = {}
    for name, item in tree.items():
        if isinstance(item, bytes):
            w.mkfile(name, item)
            want[name] = item
        else:
            assert isinstance(item, dict)
            w.opendir(name)
            for sub, data in item.items():
                w.mkfile(sub, data)
                want[name + "/" + sub] = data
            w.closedir()
    assert romfs_files(w.finalise()) == want


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_romfs_reader_refuses_junk_with_its_own_error(data: bytes) -> None:
    try:
        files = romfs_files(b"\xd2\xcd\x31" + data)
    except RomfsError:
        return  # refused, with the reader's own error (anything else fails the test)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items())


def test_capture_keeps_hashes_not_contents(signed: Signed) -> None:
    cap = capture(signed.build)
    assert len(cap.files) == cap.scan.files
    assert [n for n, _ in cap.boot_files] == ["firmware/boot.py"]
    assert isinstance(cap.romfs["firmware.romfs"], dict)


def _cli(*args: str | Path, process: bool = False) -> subprocess.CompletedProcess[str]:
    """``cityedge hw image ARGS``: in this process (Click's runner), or as a real one."""
    argv = ["hw", "image", *map(str, args)]
    if process:
        return subprocess.run([sys.executable, "-m", "cityedge.cli", *argv],
                              capture_output=True, text=True, timeout=60, check=False)
    r = CliRunner().invoke(app, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return subprocess.CompletedProcess(argv, r.exit_code, r.stdout, r.stderr)


def test_cli_exit_code_follows_the_verdicts(signed: Signed, bundle: Path) -> None:
    base = ["--release", signed.manifest, "--release-keys", signed.keys, "--release-root",
            signed.trust, "--at", str(NOW)]
    good = _cli(signed.build, *base, "--min-sequence", "4", "--json", process=True)
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert [v["outcome"] for v in doc["verdicts"]] == ["pass"] * 4
    old = _cli(signed.build, *base, "--min-sequence", "9")
    assert old.returncode == 1
    assert "FAIL             CE-UPD-04" in old.stdout
    assert old.stderr.startswith("cityedge: 1 of 4 image requirements")
    alone = _cli(signed.build, "--release", signed.manifest)
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "--release-keys" in alone.stderr


def test_a_release_file_over_the_limit_is_refused_before_reading_it(
        signed: Signed, tmp_path: Path) -> None:
    big = tmp_path / "big.cose"
    big.write_bytes(b"\x00" * (64 * 1024 + 1))
    done = _cli(signed.build, "--release", big, "--release-keys", signed.keys,
                "--release-root", signed.trust)
    assert done.returncode == 1
    assert "larger than 65536 bytes" in done.stderr


def test_every_image_verdict_names_a_requirement_an_image_probe_decides(
        signed: Signed) -> None:
    from cityedge_hardware.catalogue import load_catalogue

    by_id = {r.id: r for r in load_catalogue().requirements}
    for v in _probe(signed, signed.build).values():
        assert {"fw-image", "fw-secrets"} & set(by_id[v.requirement].probes), v.requirement
