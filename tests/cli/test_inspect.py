"""``cityedge inspect``: output for the main paths checked against expected files; exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_core import batch as batchmod
from cityedge_core import cose, p256, senml

HERE = Path(__file__).parent
DEVICE = "urn:dev:mac:0024befffe804ff1"
D = 0x0C17E06E0C17E06E0C17E06E0C17E06E


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    key = p256.PrivateKey(D)  # deterministic signatures: stable expected output
    w = batchmod.BatchWriter(DEVICE, key, cose.kid_for_public_key(key.public_key().to_sec1()))
    recs = [{senml.BN: DEVICE + ":", senml.BT: 1_700_000_000, senml.N: "temp", senml.U: "Cel",
             senml.V: 21.5}, {senml.N: "rh", senml.U: "%RH", senml.T: 1, senml.V: 48}]
    good = w.sign(recs, boot=7)
    pub = ec.derive_private_key(D, ec.SECP256R1()).public_key()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    out = {"batch": tmp_path / "batch.cose", "pub": tmp_path / "dev.pub.pem",
           "other": tmp_path / "other.pub.pem", "tampered": tmp_path / "tampered.cose",
           "garbage": tmp_path / "garbage.bin"}
    out["batch"].write_bytes(good)
    tampered = bytearray(good)
    tampered[-70] ^= 0x01  # inside the payload
    out["tampered"].write_bytes(bytes(tampered))
    out["garbage"].write_bytes(b"\x00\xff garbage")
    for name, k in (("pub", pub), ("other", other)):
        out[name].write_bytes(k.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return out


def test_valid_batch_text_output(files: dict[str, Path]) -> None:
    res = run("inspect", str(files["batch"]), "--pubkey", str(files["pub"]))
    assert res.returncode == 0, res.stderr
    assert res.stdout == (HERE / "expected" / "inspect_valid.txt").read_text()


def test_json_output(files: dict[str, Path]) -> None:
    res = run("inspect", str(files["batch"]), "--pubkey", str(files["pub"]), "--json")
    assert res.returncode == 0
    doc = json.loads(res.stdout)
    assert (doc["valid"], doc["signature"], doc["seq"], doc["device"]) == (True, "valid", 1, DEVICE)
    assert [r["n"] for r in doc["readings"]] == [DEVICE + ":temp", DEVICE + ":rh"]


def test_without_key_decodes_but_says_unchecked(files: dict[str, Path]) -> None:
    res = run("inspect", str(files["batch"]))
    assert res.returncode == 0
    assert "signature  not checked" in res.stdout


def test_wrong_key_is_invalid(files: dict[str, Path]) -> None:
    res = run("inspect", str(files["batch"]), "--pubkey", str(files["other"]))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("cityedge: invalid batch: signature")


def test_tampered_and_garbage_are_invalid_with_one_line(files: dict[str, Path]) -> None:
    for name in ("tampered", "garbage"):
        res = run("inspect", str(files[name]), "--pubkey", str(files["pub"]))
        assert res.returncode == 1, name
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith("cityedge: invalid batch:")


def test_usage_errors_exit_2(files: dict[str, Path]) -> None:
    assert run("inspect").returncode == 2
    both = run("inspect", str(files["batch"]), "--pubkey", str(files["pub"]), "--cert",
               str(files["pub"]))
    assert both.returncode == 2
    assert run("inspect", str(files["batch"]), "--pubkey", "/nonexistent.pem").returncode == 2


def test_any_flipped_payload_bit_is_reported_as_a_bad_signature(
        files: dict[str, Path], tmp_path: Path) -> None:
    """Tampering is tampering: with a key, the signature is checked over the bytes before
    the payload is decoded, so a flip that also breaks the CBOR is not called a CBOR error."""
    from typer.testing import CliRunner

    from cityedge.cli import app

    good = files["batch"].read_bytes()
    payload = cose.decode_sign1(good).payload
    start = good.index(payload)
    runner = CliRunner()
    messages = set()
    for pos in range(start, start + len(payload)):
        for bit in (0x01, 0x80):
            bad = bytearray(good)
            bad[pos] ^= bit
            path = tmp_path / "flipped.cose"
            path.write_bytes(bytes(bad))
            res = runner.invoke(app, ["inspect", str(path), "--pubkey", str(files["pub"])])
            assert res.exit_code == 1, (pos, bit)
            last = res.output.strip().splitlines()[-1]
            assert last.startswith("cityedge: invalid batch: signature does not verify"), \
                (pos, bit, last)
            messages.add(last)
    assert len(messages) == 1
