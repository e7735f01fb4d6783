"""``make firmware``: the .mpy tree, the freeze manifest and the production boot file.

The built tree must import and sign a batch on the unix port under a 64 KiB heap with
``sys.path`` pointing at it, and the signature must verify with an independent COSE
implementation (pycose). (32 KiB does not fit on the unix port: importing the core's .mpy
bytecode alone takes 33 KB of heap there; frozen into a board image it stays in flash.)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import EC2Key
from pycose.messages import CoseMessage

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".venv" / "bin" / "micropython"
D = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721  # RFC 6979 A.2.5

SIGN_SCRIPT = """
import sys, gc
sys.path.insert(0, %(tree)r)
from cityedge_core import batch, cose, p256, senml
from cityedge_fw.store import RingBuffer
key = p256.PrivateKey(%(d)d)
kid = cose.kid_for_public_key(key.public_key().to_sec1())
w = batch.BatchWriter("urn:dev:mac:0024befffe80", key, kid)
recs = [{senml.BN: "urn:dev:mac:0024befffe80:", senml.N: "air/temp", senml.U: "Cel",
         senml.V: 21.5, senml.T: 7}]
signed = w.sign(recs, 1, batch.TIME_SINCE_BOOT)
gc.collect()
print(bytes(signed).hex())
print(gc.mem_free())
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "firmware"
    done = subprocess.run(
        [sys.executable, "-m", "cityedge.build_firmware", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "modules" in done.stdout
    return out


def test_tree_keeps_packages_and_has_no_sources(built: Path) -> None:
    mpys = {p.relative_to(built).as_posix() for p in built.rglob("*.mpy")}
    for name in (
        "cityedge_core/cbor.mpy",
        "cityedge_core/p256.mpy",
        "cityedge_fw/store.mpy",
        "cityedge_fw/hal/esp32.mpy",
        "cityedge_fw/sensors/sht3x.mpy",
    ):
        assert name in mpys
    assert not list(built.rglob("cityedge_*/**/*.py"))


def test_manifest_freezes_packages_without_unix_only_modules(built: Path) -> None:
    text = (built / "manifest.py").read_text()
    assert 'include("$(PORT_DIR)/boards/manifest.py")' in text
    assert "package('cityedge_core'" in text and "package('cityedge_fw'" in text
    assert "'store.py'" in text and "'hal/esp32.py'" in text and "'hal/rp2.py'" in text
    assert "'hal/mcu.py'" in text
    assert "hal/unix" not in text and "sensors/sim" not in text
    assert 'module("boot.py"' in text
    compile(text, "manifest.py", "exec")  # the manifest is Python the freezer runs


def test_production_boot_detaches_the_repl(built: Path) -> None:
    boot = (built / "boot.py").read_text()
    assert "os.dupterm(None, 1)" in boot
    assert "MICROPY_HW_ENABLE_UART_REPL=0" in boot  # the rp2 note
    assert "main.boot()" in (built / "main.py").read_text()


def test_built_tree_signs_a_batch_in_64k_heap(built: Path) -> None:
    if not MICROPYTHON.exists():
        pytest.fail("micropython not found: run `make setup`")
    # imported from a short path, as a board imports from /lib: every module keeps its
    # file name on the heap, and pytest's own temporary paths are 50 characters long (at
    # 64 KiB that alone made the difference between signing and not)
    short = Path(tempfile.mkdtemp(prefix="ce"))
    (short / "t").symlink_to(built)
    done = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=64k", "-c",
         SIGN_SCRIPT % {"tree": str(short / "t"), "d": D}],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    signed_hex, free = done.stdout.split()
    assert int(free) > 8 * 1024  # room left for the agent's buffers after core + store
    msg = CoseMessage.decode(bytes.fromhex(signed_hex))
    pub = ec.derive_private_key(D, ec.SECP256R1()).public_key().public_numbers()
    msg.key = EC2Key(crv="P_256", x=pub.x.to_bytes(32, "big"), y=pub.y.to_bytes(32, "big"))
    assert msg.verify_signature()
    assert json.dumps(msg.payload.hex())  # a payload is there


def test_manifest_version_is_the_package_version(tmp_path: Path) -> None:
    from cityedge import build_firmware
    from cityedge_fw import VERSION

    [core, fw] = build_firmware.manifests()
    assert fw.metadata["version"] == VERSION
    assert (build_firmware.FIRMWARE / "cityedge_core").resolve() in fw.includes
    assert core.packages[0][0] == "cityedge_core"
    bad = tmp_path / "manifest.py"
    bad.write_text('metadata(version="9.9")\nimport os\n')
    with pytest.raises(build_firmware.BuildError, match="only metadata"):
        build_firmware.read_manifest(bad)


def test_device_key_parsing_reads_sec1_and_pkcs8() -> None:
    from cryptography.hazmat.primitives import serialization

    from cityedge_fw import keys

    key = ec.generate_private_key(ec.SECP256R1())
    d = key.private_numbers().private_value
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.PrivateFormat.PKCS8):
        der = key.private_bytes(serialization.Encoding.DER, fmt,
                                serialization.NoEncryption())
        assert keys.private_key_from_der(der)._d == d
