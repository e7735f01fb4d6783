"""The secret scanner (CE-AUTH-06): planted keys and passwords are caught, public material and
the project's own firmware build are clean, and no input crashes it or makes it work harder
than its limits allow."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge.build_firmware import build
from cityedge_hardware import secret_bundle
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.secret_bundle import Bundle
from cityedge_hardware.secret_scan import (
    AWS_KEY,
    DER_PRIVATE,
    HEX_KEY,
    PASSWORD,
    PEM_PRIVATE,
    ScanResult,
    scan_items,
    secrets_verdict,
)
from cityedge_hardware.verdict import Outcome

from support import cli

_EC = ec.generate_private_key(ec.SECP256R1())
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_ED = ed25519.Ed25519PrivateKey.generate()
_NOENC = serialization.NoEncryption()
_PF = serialization.PrivateFormat
_ENC = serialization.Encoding
_HEX_SECRET = "9f" * 8 + "3c1d" * 12  # 64 hex digits, a made-up test key
_PASSWORD = "Tr0ub4dor&3-planted"  # a planted test secret
_AWS = "AKIA" + "Q7TESTPLANTED0XY"


def _secret_parts(secret: bytes) -> list[bytes]:
    """Every 8-byte window of a secret's significant bytes (the PEM body, not its armour)."""
    body = b"".join(ln for ln in secret.splitlines() if not ln.startswith(b"-----"))
    return [body[i:i + 8] for i in range(0, max(1, len(body) - 7))]


# name -> (file name, file bytes, the secret inside, the kind expected)
PLANTED: dict[str, tuple[str, bytes, bytes, str]] = {
    "pem-ec-sec1": ("certs/device.pem", b"pad\n" + _EC.private_bytes(
        _ENC.PEM, _PF.TraditionalOpenSSL, _NOENC), b"", PEM_PRIVATE),
    "pem-rsa-pkcs1": ("rsa.key", _RSA.private_bytes(_ENC.PEM, _PF.TraditionalOpenSSL,
                                                    _NOENC), b"", PEM_PRIVATE),
    "pem-pkcs8-encrypted": ("enc.pem", _ED.private_bytes(
        _ENC.PEM, _PF.PKCS8, serialization.BestAvailableEncryption(b"pw")), b"", PEM_PRIVATE),
    "der-pkcs8-ec": ("lib/keys.bin", b"\x00" * 37 + _EC.private_bytes(
        _ENC.DER, _PF.PKCS8, _NOENC) + b"\xff" * 11, b"", DER_PRIVATE),
    "der-pkcs8-ed25519": ("ed.der", _ED.private_bytes(_ENC.DER, _PF.PKCS8, _NOENC), b"",
                          DER_PRIVATE),
    "der-sec1-ec": ("sec1.der", _EC.private_bytes(_ENC.DER, _PF.TraditionalOpenSSL, _NOENC),
                    b"", DER_PRIVATE),
    "der-pkcs1-rsa": ("rsa.der", b"MPY\x06" + _RSA.private_bytes(
        _ENC.DER, _PF.TraditionalOpenSSL, _NOENC), b"", DER_PRIVATE),
    "hex-key": ("config.py", b'HMAC_KEY = bytes.fromhex("%s")\n' % _HEX_SECRET.encode(),
                _HEX_SECRET.encode(), HEX_KEY),
    "password-json": ("settings.json", json.dumps(
        {"wifi": {"ssid": "city-iot", "password": _PASSWORD}}).encode(), _PASSWORD.encode(),
        PASSWORD),
    "password-py": ("secrets_local.py", b'MQTT_PASSWORD = "%s"\n' % _PASSWORD.encode(),
                    _PASSWORD.encode(), PASSWORD),
    "psk-toml": ("gateway.toml", b'[wifi]\nssid = "x"\npsk = "%s"\n' % _PASSWORD.encode(),
                 _PASSWORD.encode(), PASSWORD),
    "token-yaml": ("cfg.yaml", b"api_token: %s\n" % _PASSWORD.encode()[:-4],
                   _PASSWORD.encode()[:-4], PASSWORD),
    "aws-key": ("deploy.env", b"AWS_ACCESS_KEY_ID=%s\n" % _AWS.encode(), _AWS.encode(),
                AWS_KEY),
}
for _k, (_n, _d, _s, _kind) in list(PLANTED.items()):
    if not _s:  # a key: its secret is the file's key material
        PLANTED[_k] = (_n, _d, _d.split(b"pad\n")[-1].strip(b"\x00\xff")
                       .removeprefix(b"MPY\x06"), _kind)


def _to_dir(tmp: Path, name: str, data: bytes) -> Path:
    root = tmp / "bundle"
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
    (root / "main.py").write_bytes(b"import app\napp.run()\n")
    return root


def _to_targz(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / "bundle.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return p


def _to_zip(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / "bundle.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return p


def _to_raw(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / "image.bin"
    p.write_bytes(b"\xff" * 4096 + data + b"\xff" * 100)  # a flash dump: the file in the middle
    return p


CONTAINERS: dict[str, Callable[[Path, str, bytes], Path]] = {
    "directory": _to_dir, "tar.gz": _to_targz, "zip": _to_zip, "raw": _to_raw}


def _scan(path: Path) -> ScanResult:
    bundle = Bundle(path)
    result = scan_items(bundle.items())
    result.incomplete.extend(bundle.skipped)
    return result


@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_a_planted_secret_is_caught_with_its_kind_and_never_shown(
        tmp_path: Path, planted: str, container: str) -> None:
    name, data, secret, kind = PLANTED[planted]
    result = _scan(CONTAINERS[container](tmp_path, name, data))
    assert [f.kind for f in result.findings] == [kind], result.findings
    finding = result.findings[0]
    if container != "raw":
        assert finding.name.endswith(name)
        assert 0 <= data[finding.offset:].find(secret[:8]) < 64  # the offset is at the secret
    shown = json.dumps(result.to_json()) + json.dumps(secrets_verdict(result).to_json())
    for part in _secret_parts(secret):
        assert part.decode("latin-1") not in shown
    assert secrets_verdict(result).outcome is Outcome.FAIL
    if kind == HEX_KEY:
        assert finding.excerpt == "HMAC_KEY = <64 hex digits redacted>"


def _certificate() -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cityedge fleet CA")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(_EC.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(_EC, hashes.SHA256()))


def test_certificates_public_keys_and_digests_are_clean(tmp_path: Path) -> None:
    cert = _certificate()
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    files = {
        "ca.pem": cert.public_bytes(_ENC.PEM),
        "ca.der": cert.public_bytes(_ENC.DER),
        "fleet_pub.pem": _EC.public_key().public_bytes(_ENC.PEM, pub),
        "fleet_pub.der": _EC.public_key().public_bytes(_ENC.DER, pub),
        "rsa_pub.der": _RSA.public_key().public_bytes(_ENC.DER, serialization.PublicFormat.PKCS1),
        "cmd_key.json": json.dumps({"command_public_key": _ED.public_key().public_bytes(
            _ENC.Raw, serialization.PublicFormat.Raw).hex()}).encode(),
        "manifest.json": json.dumps({"files": [
            {"name": "app.mpy", "sha256": "ab" * 32},
            {"name": "key_store.mpy", "sha256": "cd" * 32, "key_digest": "ef" * 32}],
            "token_ttl_s": 300}).encode(),
        "boot.py": b"password = read_password()\ntoken = enroll.token_from_nvs()\n"
                   b'PASS = "pass"\nWIFI_PASSWORD = "<set at provisioning>"\n',
    }
    root = tmp_path / "clean"
    root.mkdir()
    for n, d in files.items():
        (root / n).write_bytes(d)
    result = _scan(root)
    assert result.files == len(files)
    assert result.findings == []
    assert secrets_verdict(result).outcome is Outcome.PASS


@pytest.fixture(scope="module")
def firmware_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fw") / "firmware"
    build(out)
    return out


def test_the_projects_own_firmware_build_is_clean(firmware_build: Path) -> None:
    tree = _scan(firmware_build)
    assert tree.files > 20 and any(n.endswith(".mpy") for n in
                                   (p.name for p in firmware_build.rglob("*")))
    assert tree.findings == [] and tree.incomplete == []
    image = firmware_build.parent / "firmware.romfs"
    romfs = _scan(image)
    assert romfs.files == 1 and romfs.bytes == image.stat().st_size
    assert romfs.findings == [] and romfs.incomplete == []


def test_a_secret_planted_in_the_romfs_image_is_caught(firmware_build: Path,
                                                       tmp_path: Path) -> None:
    image = (firmware_build.parent / "firmware.romfs").read_bytes()
    key = _EC.private_bytes(_ENC.DER, _PF.PKCS8, _NOENC)
    result = scan_items([("firmware.romfs", image[:5000] + key + image[5000:])])
    assert [(f.kind, f.offset) for f in result.findings] == [(DER_PRIVATE, 5000)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli.run(["hw", "secrets", *args], os.environ)  # in process (support.cli)


def test_cli_exits_1_on_a_finding_and_0_on_the_firmware_build(
        firmware_build: Path, tmp_path: Path) -> None:
    clean = _cli(str(firmware_build))
    assert clean.returncode == 0, clean.stderr
    assert "PASS             CE-AUTH-06 fw-secrets" in clean.stdout
    name, data, secret, _ = PLANTED["password-json"]
    bad = _cli(str(_to_dir(tmp_path, name, data)), "--json")
    assert bad.returncode == 1
    assert bad.stderr.startswith("cityedge: 1 secret(s) found, 0 file(s) not fully scanned")
    doc = json.loads(bad.stdout)
    assert doc["verdicts"][0]["outcome"] == "fail"
    assert [f["kind"] for f in doc["scan"]["findings"]] == ["password"]
    assert secret.decode() not in bad.stdout + bad.stderr
    missing = _cli(str(tmp_path / "nope"))
    assert missing.returncode == 1 and missing.stderr.startswith("cityedge: ")


def test_der_candidates_are_capped_and_the_verdict_says_undecided() -> None:
    # SEQUENCE { INTEGER 0, INTEGER 0 }: a candidate header that never parses as a key
    junk = b"\x30\x06\x02\x01\x00\x02\x01\x00" * (LIMITS.secret_der_candidates + 10)
    result = scan_items([("junk.bin", junk)])
    assert result.der_parses == LIMITS.secret_der_candidates
    assert result.findings == []
    assert secrets_verdict(result).outcome is Outcome.UNDECIDED


def test_a_file_over_the_size_limit_is_reported_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secret_bundle, "LIMITS",
                        dataclasses.replace(LIMITS, secret_file_max_bytes=100))
    (tmp_path / "big.bin").write_bytes(b"\x00" * 101)
    (tmp_path / "small.txt").write_bytes(b"hello")
    result = _scan(tmp_path)
    assert result.files == 1
    assert result.incomplete == ["big.bin: 101 bytes, over 100"]
    assert secrets_verdict(result).outcome is Outcome.UNDECIDED


_FRAGMENTS = st.sampled_from([b"\x30\x82", b"\x30\x81\x87", b"\x02\x01\x00\x30", b"\x04",
                              b"-----BEGIN PRIVATE KEY-----", b"key = ", b'"password": "',
                              b"AKIA", b"a" * 64, b"\n", b'"'])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), _FRAGMENTS), max_size=60))
def test_any_bytes_scan_without_error_and_bounded_work(parts: list[bytes]) -> None:
    data = b"".join(parts)
    result = scan_items([("fuzz.bin", data)])
    assert result.bytes == len(data)
    assert result.der_parses <= min(LIMITS.secret_der_candidates, data.count(b"\x30"))
    assert len(result.findings) <= min(LIMITS.secret_findings_per_file, len(data))
    assert all(0 <= f.offset < len(data) for f in result.findings)


@pytest.mark.parametrize(("line", "name"), [
    (b'wifiPassword: "hunter22"\n', "wifiPassword"),
    (b'{"pass": "hunter22"}', "pass"),
    (b"AWS_SECRET_ACCESS_KEY=abcdefghijkl\n", "AWS_SECRET_ACCESS_KEY"),
    (b'client_secret = "abcdefgh"\n', "client_secret"),
    (b'mqtt.token = "abcdefgh"\n', "mqtt.token"),
    (b'bypass = "hunter22"\n', None),
    (b"compass: northeast\n", None),
    (b'password_hash = "abcdefgh"\n', None),
    (b'token_url = "https://x/y"\n', None),
    (b'password = ""\n', None),
    (b'psk = "${WIFI_PSK}"\n', None),
])
def test_a_password_is_a_literal_under_a_secrets_name(line: bytes, name: str | None) -> None:
    found = scan_items([("config.yaml", line)]).findings
    assert [f.excerpt.split(" = ")[0] for f in found] == ([name] if name else [])


def test_a_key_in_an_archive_inside_the_bundle_is_caught(tmp_path: Path) -> None:
    name, data, _, kind = PLANTED["der-pkcs8-ec"]
    inner = _to_targz(tmp_path, name, data).read_bytes()
    result = _scan(_to_zip(tmp_path, "release/extra.tar.gz", inner))
    assert [(f.name, f.kind) for f in result.findings] == [
        ("release/extra.tar.gz!" + name, kind)]
    root = tmp_path / "tree"
    root.mkdir()
    (root / "extra.zip").write_bytes(_to_zip(tmp_path, name, data).read_bytes())
    assert [f.name for f in _scan(root).findings] == ["extra.zip!" + name]
