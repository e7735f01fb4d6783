"""CA key custody: the root's and the intermediate's keys encrypted at rest with a passphrase
from a file, or the intermediate in a PKCS#11 token (SoftHSM2, a real token in a temporary
folder); signing devices' certificates and CRLs under each custody, through the API too;
a wrong passphrase or PIN fails in one line; no CA key lies on disk in clear."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_fleet.app import create_app
from cityedge_fleet.ca import CertificateAuthority, Revoked, init_ca, issue_service
from cityedge_fleet.ca_custody import (
    CaError,
    Custody,
    TokenKey,
    custody_of,
    read_secret_file,
    token_session,
)
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Role

from support.fleet import Api, enroll_device, make_csr
from support.softhsm import SoftHsm, Token, module_path

ROOT = Path(__file__).resolve().parents[2]
CUSTODIES = ["plain", "encrypted", "pkcs11"]
DEVICE = "urn:dev:mac:0024befffe804ff1"
PEM_CLEAR = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY-----")


@pytest.fixture(scope="module")
def hsm() -> Iterator[SoftHsm]:
    """SoftHSM2 tokens for this module's tests (this process loads the module once)."""
    module = module_path()
    if module is None:
        pytest.fail("SoftHSM2 is missing: `make system-deps` installs Debian's softhsm2")
    base = Path(tempfile.mkdtemp(prefix="cityedge-hsm-"))
    old = os.environ.get("SOFTHSM2_CONF")
    hsm = SoftHsm(base, module, tokens=12)
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    yield hsm
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old
    shutil.rmtree(base, ignore_errors=True)


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def make_ca(kind: str, tmp_path: Path, hsm: SoftHsm) -> tuple[Path, Path, Custody]:
    """(root_dir, ca_dir, custody) of a CA made with ``kind`` of custody."""
    root, ca_dir = tmp_path / "root", tmp_path / "ca"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if kind == "plain":
        init_ca(root, ca_dir)
        return root, ca_dir, Custody()
    root_pw = secret_file(tmp_path / "root.pass", "root passphrase %s\n" % os.urandom(4).hex())
    if kind == "encrypted":
        custody = Custody(password_file=secret_file(tmp_path / "ca.pass", "ca passphrase\n"))
    else:
        custody = Custody(token=hsm.take().config)
    init_ca(root, ca_dir, root_password=read_secret_file(root_pw, "root"), custody=custody)
    return root, ca_dir, custody


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def openssl_verify(tmp_path: Path, ca: CertificateAuthority, leaf: bytes,
                   crl: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``leaf`` to the root, through the intermediate (and the CRL)."""
    (tmp_path / "v-root.pem").write_bytes(pem(ca.root))
    (tmp_path / "v-inter.pem").write_bytes(pem(ca.cert))
    (tmp_path / "v-leaf.pem").write_bytes(leaf)
    args = ["openssl", "verify", "-CAfile", str(tmp_path / "v-root.pem"),
            "-untrusted", str(tmp_path / "v-inter.pem")]
    if crl is not None:
        args += ["-crl_check", "-CRLfile", str(crl)]
    return subprocess.run([*args, str(tmp_path / "v-leaf.pem")], capture_output=True,
                          text=True, timeout=30)


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args],
                          env={"PATH": os.environ["PATH"], **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def files_under(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in sorted(d.rglob("*")) if p.is_file()]


def assert_no_key_in_clear(dirs: list[Path], scalars: list[int]) -> None:
    """No PEM private key block that is not encrypted, and none of the keys' scalars (raw,
    or in hex), in any file under ``dirs``."""
    needles = []
    for d in scalars:
        raw = d.to_bytes(32, "big")
        needles += [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for path in files_under(*dirs):
        data = path.read_bytes()
        for marker in PEM_CLEAR:
            assert marker not in data, "%s holds a private key in clear" % path
        for needle in needles:
            assert needle not in data, "%s holds a CA key's scalar" % path


@pytest.mark.parametrize("kind", CUSTODIES)
def test_signing_works_under_each_custody(kind: str, tmp_path: Path, hsm: SoftHsm) -> None:
    """A device certificate, a service certificate and a CRL signed with the key in a file
    (clear, development), in an encrypted file, and in the token: each verifies to the root
    with OpenSSL, and the CRL revokes what it lists."""
    _, ca_dir, custody = make_ca(kind, tmp_path, hsm)
    ca = CertificateAuthority(ca_dir, custody)
    assert isinstance(ca.signer.key, TokenKey) == (kind == "pkcs11")
    csr, _ = make_csr(DEVICE)
    cert = ca.sign_csr(csr, DEVICE)
    ok = openssl_verify(tmp_path, ca, pem(cert))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stderr
    svc_crt, _ = issue_service(ca, "fleet-ingest", tmp_path / "svc")
    ok = openssl_verify(tmp_path, ca, svc_crt.read_bytes().split(b"-----END")[0]
                        + b"-----END CERTIFICATE-----\n")
    assert ok.returncode == 0, ok.stderr
    # the published CRL (written by init through the same custody) verifies, then one that
    # lists the device's serial revokes it
    assert openssl_verify(tmp_path, ca, pem(cert), ca.crl_path).returncode == 0
    ca.write_crl([Revoked(cert.serial_number, dt.datetime.now(dt.UTC))], 3600)
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert ca.crl_serials() == {cert.serial_number}
    refused = openssl_verify(tmp_path, ca, pem(cert), ca.crl_path)
    assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr
    if kind == "encrypted":  # PKCS#8 PBES2 with scrypt, N = 2^17, not PBKDF2
        parsed = subprocess.run(["openssl", "asn1parse", "-in", str(ca_dir /
                                 "intermediate.key")], capture_output=True, text=True,
                                timeout=30)
        assert ":PBES2" in parsed.stdout and ":scrypt" in parsed.stdout, parsed.stdout
        assert "INTEGER           :020000" in parsed.stdout
        assert "PBKDF2" not in parsed.stdout
    if kind == "pkcs11":
        with pytest.raises(CaError, match="cannot be exported"):
            ca.signer.key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        assert not list(ca_dir.rglob("*.key"))


def _settings(kind: str, tmp_path: Path, ca_dir: Path, custody: Custody) -> Settings:
    extra: dict[str, object] = {}
    if custody.password_file is not None:
        extra["ca_password_file"] = custody.password_file
    if custody.token is not None:
        extra.update(ca_pkcs11_module=custody.token.module,
                     ca_pkcs11_token=custody.token.token_label,
                     ca_pkcs11_pin_file=custody.token.pin_file,
                     ca_pkcs11_key_label=custody.token.key_label)
    return Settings(mode="development", database_url="sqlite:///%s" % (tmp_path / "f.db"),
                    ca_dir=ca_dir, broker_url="mqtts://127.0.0.1:8883",
                    ingest_with_serve=False, commands_with_serve=False,
                    audit_anchor_file=tmp_path / "audit.anchor",
                    audit_key_file=tmp_path / "audit.key",
                    command_key_file=tmp_path / "command.key", **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", CUSTODIES)
def test_a_device_enrolled_through_the_api_under_each_custody_chains_to_the_root(
        kind: str, tmp_path: Path, hsm: SoftHsm) -> None:
    """The fleet opens the intermediate as its settings say (CITYEDGE_CA_PASSWORD_FILE, the
    CITYEDGE_CA_PKCS11_* settings): the enrolled device's chain verifies to the root, and
    its emergency revocation re-signs the CRL (through the token) so OpenSSL refuses it."""
    _, ca_dir, custody = make_ca(kind, tmp_path, hsm)
    settings = _settings(kind, tmp_path, ca_dir, custody)
    app = create_app(settings, init_db=True)
    with TestClient(app) as client:
        api = Api(client, settings)
        dev = enroll_device(api, 1)
        answer = dev.enrollment
        ca = CertificateAuthority(ca_dir, custody_of(settings))
        assert isinstance(ca.signer.key, TokenKey) == (kind == "pkcs11")
        ok = openssl_verify(tmp_path, ca, str(answer["certificate_pem"]).encode())
        assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stderr
        assert answer["ca_bundle_pem"] == ca.root_pem()
        r = client.post("/devices/%s/revoke" % dev.id, json={"reason": "key-compromise"},
                        headers=api.headers(Role.security))
        assert r.status_code == 200, r.text
    app.state.engine.dispose()
    leaf = x509.load_pem_x509_certificate(str(answer["certificate_pem"]).encode())
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    refused = openssl_verify(tmp_path, ca, str(answer["certificate_pem"]).encode(),
                             ca.crl_path)
    assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr


def _production(tmp_path: Path, ca_dir: Path, **extra: object) -> Settings:
    return Settings(mode="production", database_url="postgresql://fleet@db/fleet",
                    ca_dir=ca_dir, broker_url="mqtts://broker.city:8883",
                    audit_anchor_file=tmp_path / "anchor", audit_key_file=tmp_path / "a.key",
                    ingest_share_group="ingest-7f3a9c21",
                    broker_control_cert_file=Path("/srv/c.crt"),
                    broker_control_key_file=Path("/srv/c.key"),
                    command_key_file=Path("/srv/command.key"),
                    commands_cert_file=Path("/srv/m.crt"),
                    commands_key_file=Path("/srv/m.key"), **extra)  # type: ignore[arg-type]


def test_production_refuses_an_intermediate_key_in_clear(tmp_path: Path,
                                                         hsm: SoftHsm) -> None:
    """Development reads a key file in clear; production refuses it, naming the variables
    that fix it, and accepts the key encrypted or in the token."""
    _, plain_dir, _ = make_ca("plain", tmp_path / "p", hsm)
    CertificateAuthority(plain_dir, custody_of(_settings("plain", tmp_path, plain_dir,
                                                          Custody())))
    with pytest.raises(CaError) as e:
        CertificateAuthority(plain_dir, custody_of(_production(tmp_path, plain_dir)))
    assert "is not encrypted: production refuses" in str(e.value)
    assert "CITYEDGE_CA_PASSWORD_FILE" in str(e.value)
    assert "CITYEDGE_CA_PKCS11_MODULE" in str(e.value)
    from cityedge_fleet.serve import serve

    with pytest.raises(ValueError, match="is not encrypted: production refuses"):
        serve(_production(tmp_path, plain_dir), "127.0.0.1", 0)  # before it listens
    # a passphrase file does not make a clear key acceptable
    pw = secret_file(tmp_path / "pw", "a passphrase\n")
    with pytest.raises(CaError, match="is not encrypted"):
        CertificateAuthority(plain_dir, custody_of(_production(tmp_path, plain_dir,
                                                                ca_password_file=pw)))
    _, enc_dir, enc = make_ca("encrypted", tmp_path / "e", hsm)
    assert enc.password_file is not None
    CertificateAuthority(enc_dir, custody_of(_production(
        tmp_path, enc_dir, ca_password_file=enc.password_file)))
    _, tok_dir, tok = make_ca("pkcs11", tmp_path / "t", hsm)
    assert tok.token is not None
    ca = CertificateAuthority(tok_dir, custody_of(_production(
        tmp_path, tok_dir, ca_pkcs11_module=tok.token.module,
        ca_pkcs11_token=tok.token.token_label, ca_pkcs11_pin_file=tok.token.pin_file)))
    assert isinstance(ca.signer.key, TokenKey)


def test_a_wrong_passphrase_or_pin_fails_in_one_line_naming_the_file(
        tmp_path: Path, hsm: SoftHsm) -> None:
    """`ca issue-service` (the fleet's settings) with a wrong or missing passphrase file,
    and with a wrong PIN: exit 1, one line naming the file, no traceback, nothing issued
    (a loose or empty file: the same `CaError` line, test_passphrase_and_pin_files_are_
    checked)."""
    _, ca_dir, custody = make_ca("encrypted", tmp_path / "e", hsm)
    out = tmp_path / "out"
    env = {"CITYEDGE_MODE": "development", "CITYEDGE_CA_DIR": str(ca_dir)}
    args = ["ca", "issue-service", "--cn", "fleet-ingest", "--out-dir", str(out)]
    key = ca_dir / "intermediate.key"
    wrong = secret_file(tmp_path / "wrong.pass", "not the passphrase\n")
    cases = [
        (wrong, "cityedge: wrong passphrase for the CA key %s (passphrase from %s)"
         % (key, wrong)),
        (None, "cityedge: the CA key %s is encrypted: give its passphrase file "
         "(CITYEDGE_CA_PASSWORD_FILE)" % key),
    ]
    for pw, line in cases:
        r = cli(args, {**env, **({"CITYEDGE_CA_PASSWORD_FILE": str(pw)} if pw else {})},
                tmp_path)
        assert r.returncode == 1, r.stdout
        assert r.stderr.splitlines() == [line], r.stderr
        assert not out.exists()
    assert custody.password_file is not None
    with pytest.raises(CaError, match="is open to other users"):
        secret_file(custody.password_file, "ca passphrase\n", 0o644)
        CertificateAuthority(ca_dir, custody)
    # the token with a wrong PIN
    _, tok_dir, tok = make_ca("pkcs11", tmp_path / "t", hsm)
    assert tok.token is not None
    bad_pin = secret_file(tmp_path / "bad.pin", "000000\n")
    r = cli(["ca", "issue-service", "--cn", "fleet-ingest", "--out-dir", str(out / "t")],
            {"CITYEDGE_MODE": "development", "CITYEDGE_CA_DIR": str(tok_dir),
             "CITYEDGE_CA_PKCS11_MODULE": str(tok.token.module),
             "CITYEDGE_CA_PKCS11_TOKEN": tok.token.token_label,
             "CITYEDGE_CA_PKCS11_PIN_FILE": str(bad_pin), **hsm.env}, tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["cityedge: wrong PIN for PKCS#11 token %r (PIN from %s)"
                                     % (tok.token.token_label, bad_pin)], r.stderr
    assert not (out / "t").exists()


def test_no_ca_key_lies_on_disk_in_clear_through_init_issue_and_rollover(
        tmp_path: Path) -> None:
    """`ca init` with passphrase files, `ca issue-service`, `ca rollover` (the encrypted
    root opened with its own file): every CA key file in the root and CA directories is
    encrypted, and no key's scalar appears in any file; the rollover refuses to run
    without the root's passphrase, in one line."""
    root, ca_dir = tmp_path / "root", tmp_path / "ca"
    root_pw = secret_file(tmp_path / "root.pass", "the root's own passphrase\n")
    ca_pw = secret_file(tmp_path / "ca.pass", "the intermediate's passphrase\n")
    env = {"CITYEDGE_CA_PASSWORD_FILE": str(ca_pw)}
    r = cli(["ca", "init", "--root-dir", str(root), "--out-dir", str(ca_dir),
             "--root-password-file", str(root_pw)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "encrypted" in r.stdout and "in clear" not in r.stdout
    r = cli(["ca", "issue-service", "--cn", "fleet-ingest", "--out-dir", str(tmp_path / "s")],
            {**env, "CITYEDGE_MODE": "development", "CITYEDGE_CA_DIR": str(ca_dir)}, tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli(["ca", "rollover", "--root-dir", str(root), "--ca-dir", str(ca_dir)], env,
            tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        "cityedge: the CA key %s is encrypted: give its passphrase file "
        "(--root-password-file)" % (root / "root.key")), r.stderr
    r = cli(["ca", "rollover", "--root-dir", str(root), "--ca-dir", str(ca_dir),
             "--root-password-file", str(root_pw)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    keys = sorted([*root.rglob("*.key"), *ca_dir.rglob("*.key")])
    assert len(keys) == 3  # the root, the intermediate in overlap and the new one
    scalars = []
    for path in keys:
        pw = root_pw if path.parent == root else ca_pw
        k = serialization.load_pem_private_key(path.read_bytes(),
                                               read_secret_file(pw, "test"))
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        scalars.append(k.private_numbers().private_value)
    assert_no_key_in_clear([root, ca_dir], scalars)
    ca = CertificateAuthority(ca_dir, Custody(password_file=ca_pw))
    assert len(ca.intermediates) == 2


def test_import_to_token_moves_the_key_and_the_fleet_signs_through_it(
        tmp_path: Path, hsm: SoftHsm) -> None:
    """`ca import-to-token` on an encrypted intermediate: the key goes into the token
    (sensitive, not extractable), its file is overwritten and removed, and neither the CA
    directory nor SoftHSM's token store holds its scalar; the CA signs through the token."""
    _, ca_dir, custody = make_ca("encrypted", tmp_path, hsm)
    assert custody.password_file is not None
    before = CertificateAuthority(ca_dir, custody)
    scalar = before.signer.key.private_numbers().private_value
    token: Token = hsm.take()
    r = cli(["ca", "import-to-token", "--ca-dir", str(ca_dir),
             "--pkcs11-module", str(token.config.module),
             "--pkcs11-token", token.config.token_label,
             "--pkcs11-pin-file", str(token.config.pin_file),
             "--password-file", str(custody.password_file)], hsm.env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "now signs from PKCS#11 token" in r.stdout
    assert not list(ca_dir.rglob("*.key"))
    assert (ca_dir / "intermediates" / (before.id + ".token")).is_file()
    assert_no_key_in_clear([ca_dir, hsm.token_dir], [scalar])
    ca = CertificateAuthority(ca_dir, Custody(token=token.config))
    assert ca.id == before.id and isinstance(ca.signer.key, TokenKey)
    cert = ca.sign_csr(make_csr(DEVICE)[0], DEVICE)
    assert openssl_verify(tmp_path, ca, pem(cert)).returncode == 0
    import pkcs11

    obj = token_session(token.config).find_key(bytes.fromhex(ca.id))
    assert obj[pkcs11.Attribute.SENSITIVE] is True
    assert obj[pkcs11.Attribute.EXTRACTABLE] is False
    # a second import of the same key is refused: the CA already signs through the token
    r = cli(["ca", "import-to-token", "--ca-dir", str(ca_dir),
             "--pkcs11-module", str(token.config.module),
             "--pkcs11-token", token.config.token_label,
             "--pkcs11-pin-file", str(token.config.pin_file)], hsm.env, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_passphrase_and_pin_files_are_checked(tmp_path: Path) -> None:
    """A passphrase file is a regular file open to its owner only (0600 or 0400), not
    empty, not over 1 KiB; one trailing newline is not part of the passphrase."""
    assert read_secret_file(secret_file(tmp_path / "a", "pass phrase\n"), "x") == \
        b"pass phrase"
    assert read_secret_file(secret_file(tmp_path / "b", "crlf\r\n", 0o400), "x") == b"crlf"
    assert read_secret_file(secret_file(tmp_path / "c", "two\n\n"), "x") == b"two\n"
    for name, text, mode, why in [("d", "pw", 0o640, "open to other users (mode 640)"),
                                  ("e", "pw", 0o604, "open to other users (mode 604)"),
                                  ("f", "", 0o600, "is empty"),
                                  ("g", "\n", 0o600, "is empty"),
                                  ("h", "x" * 1025, 0o600, "holds more than 1024 bytes")]:
        with pytest.raises(CaError, match=why.replace("(", r"\(").replace(")", r"\)")):
            read_secret_file(secret_file(tmp_path / name, text, mode), "CA passphrase")
    with pytest.raises(CaError, match="is not a regular file"):
        read_secret_file(tmp_path, "CA passphrase")
    with pytest.raises(CaError, match="No such file"):
        read_secret_file(tmp_path / "absent", "CA passphrase")


def test_the_settings_hold_the_passphrase_file_never_the_passphrase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet process that logs its settings logs the file's path: no setting takes the
    passphrase or the PIN itself; a token without its label or PIN file is a settings
    error naming the variables."""
    for name in list(os.environ):
        if name.startswith("CITYEDGE_"):
            monkeypatch.delenv(name)
    passphrase = "correct horse %s" % os.urandom(6).hex()
    pw = secret_file(tmp_path / "ca.pass", passphrase + "\n")
    monkeypatch.setenv("CITYEDGE_MODE", "development")
    monkeypatch.setenv("CITYEDGE_CA_PASSWORD_FILE", str(pw))
    monkeypatch.setenv("CITYEDGE_CA_PASSWORD", passphrase)  # not a setting: ignored
    s = Settings()  # type: ignore[call-arg]
    shown = repr(s) + s.model_dump_json() + str(s.model_dump())
    assert passphrase not in shown and str(pw) in shown
    assert custody_of(s).password() == passphrase.encode()
    assert not [f for f in Settings.model_fields if "pass" in f or "pin" in f
                if not f.endswith("_file")]
    monkeypatch.setenv("CITYEDGE_CA_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
    from pydantic import ValidationError

    from cityedge_fleet.config import describe_errors

    with pytest.raises(ValidationError) as e:
        Settings()  # type: ignore[call-arg]
    [line] = describe_errors(e.value)
    assert line.startswith("CITYEDGE_CA_PKCS11_TOKEN and CITYEDGE_CA_PKCS11_PIN_FILE must "
                           "be set with CITYEDGE_CA_PKCS11_MODULE"), line


def test_ca_init_makes_the_intermediate_inside_the_token(tmp_path: Path,
                                                         hsm: SoftHsm) -> None:
    """`ca init --pkcs11-*`: the intermediate's key is generated in the token and never
    exists as a file; the CA directory records it, and the fleet signs through it."""
    token = hsm.take()
    root, ca_dir = tmp_path / "root", tmp_path / "ca"
    root_pw = secret_file(tmp_path / "root.pass", "root passphrase\n")
    r = cli(["ca", "init", "--root-dir", str(root), "--out-dir", str(ca_dir),
             "--root-password-file", str(root_pw), "--pkcs11-module",
             str(token.config.module), "--pkcs11-token", token.config.token_label,
             "--pkcs11-pin-file", str(token.config.pin_file)], hsm.env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "in PKCS#11 token %r" % token.config.token_label in r.stdout
    assert not list(ca_dir.rglob("*.key"))
    root_key = serialization.load_pem_private_key((root / "root.key").read_bytes(),
                                                  b"root passphrase")
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    assert_no_key_in_clear([root, ca_dir], [root_key.private_numbers().private_value])
    ca = CertificateAuthority(ca_dir, Custody(token=token.config))
    assert isinstance(ca.signer.key, TokenKey)
    ca.cert.verify_directly_issued_by(ca.root)
    assert ca.crl_serials() == set()  # the first CRL, signed through the token, verifies
    # another token's key with the same label and id cannot stand in for it
    other = hsm.take()
    with pytest.raises(CaError, match="holds 0 private keys"):
        CertificateAuthority(ca_dir, Custody(token=other.config))


def test_encrypt_keys_encrypts_a_ca_made_in_clear_and_production_then_accepts_it(
        tmp_path: Path) -> None:
    """`ca encrypt-keys` on a CA `ca init` wrote in clear (the intermediates after a
    rollover, then the root with its own passphrase): the files become encrypted, the
    scalars are gone from the directories, the same keys sign, and a second run leaves
    them alone."""
    root, ca_dir = tmp_path / "root", tmp_path / "ca"
    init_ca(root, ca_dir)
    from cityedge_fleet.ca_rollover import rollover

    rollover(root, ca_dir)
    before = CertificateAuthority(ca_dir)
    root_key = serialization.load_pem_private_key((root / "root.key").read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    scalars = [i.key.private_numbers().private_value for i in before.intermediates]
    scalars.append(root_key.private_numbers().private_value)
    ca_pw = secret_file(tmp_path / "ca.pass", "intermediates\n")
    root_pw = secret_file(tmp_path / "root.pass", "root\n")
    r = cli(["ca", "encrypt-keys", "--ca-dir", str(ca_dir), "--password-file", str(ca_pw)],
            {}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("encrypted 2 key file(s)")
    r = cli(["ca", "encrypt-keys", "--root-dir", str(root), "--password-file", str(root_pw)],
            {}, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("encrypted 1 key file(s)"), r.stderr
    assert_no_key_in_clear([root, ca_dir], scalars)
    again = cli(["ca", "encrypt-keys", "--ca-dir", str(ca_dir), "--password-file",
                 str(ca_pw)], {}, tmp_path)
    assert again.stdout.startswith("encrypted 0 key file(s)"), again.stderr
    production = custody_of(_production(tmp_path, ca_dir, ca_password_file=ca_pw))
    after = CertificateAuthority(ca_dir, production)
    assert [i.id for i in after.intermediates] == [i.id for i in before.intermediates]
    assert [i.key.private_numbers().private_value for i in after.intermediates] == \
        scalars[:2]
    # the encrypted root still signs (a command-key statement), opened with its own file
    from cityedge_fleet import command_key_rotation as ckr
    from cityedge_host.crypto import EcSigner, public_sec1

    point = public_sec1(EcSigner.generate().public_key)
    with pytest.raises(ckr.CommandKeyRotationError, match="is encrypted: give its "
                       "passphrase file"):
        ckr.announce(root, point)
    assert ckr.announce(root, point, root_password_file=root_pw).version == 1


_KEY = ec.generate_private_key(ec.SECP256R1())


@given(password=st.binary(min_size=1, max_size=1024), log_n=st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_the_pkcs8_scrypt_writer_round_trips_through_cryptographys_reader(
        password: bytes, log_n: int) -> None:
    """The DER the custody writes (lengths short and long, scrypt's N as a positive
    INTEGER even when its top bit is set) is what `cryptography` reads back: the same key
    for the passphrase, a refusal for any other. N is lowered here to keep the property
    fast; the written N is checked in test_signing_works_under_each_custody."""
    import cityedge_fleet.ca_custody as custody_module

    old = custody_module.SCRYPT_LOG_N
    custody_module.SCRYPT_LOG_N = log_n
    try:
        data = custody_module.encrypt_pkcs8(_KEY, password)
    finally:
        custody_module.SCRYPT_LOG_N = old
    assert custody_module.is_encrypted(data) and b"PRIVATE KEY-----\nMI" in data
    back = serialization.load_pem_private_key(data, password)
    assert isinstance(back, ec.EllipticCurvePrivateKey)
    assert back.private_numbers() == _KEY.private_numbers()
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(data, password + b"x")


def test_a_rollover_from_a_token_intermediate_then_its_retirement(
        tmp_path: Path, hsm: SoftHsm) -> None:
    """The intermediate in the token rolls over: the new one is an encrypted file, the old
    one (still in the token) signs its own CRL during the overlap, and retiring it removes
    its `.token` record; the CA keeps signing throughout."""
    from sqlmodel import Session

    from cityedge_fleet import ca_retire
    from cityedge_fleet.ca_rollover import rollover
    from cityedge_fleet.db import make_engine, migrate

    root_dir, ca_dir, custody = make_ca("pkcs11", tmp_path, hsm)
    assert custody.token is not None
    pw = secret_file(tmp_path / "ca.pass", "intermediates\n")
    both = Custody(password_file=pw, token=custody.token)
    old_id = CertificateAuthority(ca_dir, both).id
    done = rollover(root_dir, ca_dir, root_password_file=tmp_path / "root.pass",
                    custody=both)
    assert done.old_id == old_id
    ca = CertificateAuthority(ca_dir, both)
    assert not isinstance(ca.signer.key, TokenKey)
    assert [isinstance(i.key, TokenKey) for i in ca.overlap] == [True]
    assert (ca_dir / "intermediates" / (ca.id + ".key")).read_bytes().startswith(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    ca.write_crl([], 3600)
    assert ca.crl_serials() == set()  # a CRL of each, the old one's through the token
    settings = _settings("pkcs11", tmp_path, ca_dir, both).model_copy(
        update={"ca_password_file": pw})
    engine = make_engine(settings, create=True)
    migrate(engine, create=True)
    try:
        with Session(engine) as session:
            ca_retire.retire(session, ca_dir, settings, by="test")
    finally:
        engine.dispose()
    assert sorted(p.name for p in (ca_dir / "intermediates").iterdir()) == [
        ca.id + ".crt", ca.id + ".key"]
    after = CertificateAuthority(ca_dir, both)
    assert after.overlap == [] and after.id == ca.id
    cert = after.sign_csr(make_csr(DEVICE)[0], DEVICE)
    assert openssl_verify(tmp_path, after, pem(cert), after.crl_path).returncode == 0
