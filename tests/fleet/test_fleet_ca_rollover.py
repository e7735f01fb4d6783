"""Intermediate CA rollover (``ca_rollover``): the new intermediate signs, the old one stays
in service for the overlap with a CRL of its own, certificates chain to the root through
either (``openssl verify``), every refusal says why, and a rollover cut at any file
operation leaves a CA that signs and completes when run again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cityedge_fleet import ca_rollover
from cityedge_fleet.ca import (
    BROKER_BUNDLE,
    CURRENT_FILE,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    INTERMEDIATES_DIR,
    ROOT_CERT,
    ROOT_KEY,
    CertificateAuthority,
    Revoked,
    init_ca,
    issuer_id,
    load_crls,
    load_current,
)
from cityedge_fleet.ca_rollover import NEXT_CERT, NEXT_KEY, RolloverRefused, rollover

from support.fleet import DEVICE, make_csr


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    init_ca(tmp_path / "root", tmp_path / "ca")
    return tmp_path / "root", tmp_path / "ca"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def openssl_verifies(tmp: Path, root: Path, chain: list[x509.Certificate]) -> bool:
    """``openssl verify`` of ``chain[0]`` trusting ``root`` alone, the rest untrusted."""
    leaf, untrusted = tmp / "leaf.pem", tmp / "untrusted.pem"
    leaf.write_bytes(_pem(chain[0]))
    untrusted.write_bytes(b"".join(_pem(c) for c in chain[1:]))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(root)]
    if chain[1:]:
        args += ["-untrusted", str(untrusted)]
    r = subprocess.run([*args, str(leaf)], capture_output=True, timeout=30)
    return r.returncode == 0


def signs_and_chains(ca_dir: Path, root_dir: Path, tmp: Path) -> str:
    """The directory's CA signs a CSR, and the certificate chains to the root through the
    intermediate it names; returns the signer's id."""
    ca = CertificateAuthority(ca_dir)
    cert = ca.sign_csr(make_csr()[0], DEVICE)
    assert issuer_id(cert) == ca.id
    assert openssl_verifies(tmp, root_dir / ROOT_CERT, [cert, ca.cert])
    return ca.id


def test_the_new_intermediate_signs_and_the_old_one_stays_for_the_overlap(
        dirs: tuple[Path, Path], tmp_path: Path) -> None:
    root_dir, ca_dir = dirs
    before = CertificateAuthority(ca_dir)
    old_cert = before.sign_csr(make_csr()[0], DEVICE)
    ca = CertificateAuthority(ca_dir)
    ca.write_crl([Revoked(0xABC, old_cert.not_valid_before_utc)], 3600)

    done = rollover(root_dir, ca_dir)

    assert done.old_id == before.id and done.new_id != before.id and done.migrated
    assert done.new_subject == "cityedge device CA g2"
    after = CertificateAuthority(ca_dir)
    assert after.id == done.new_id and [i.id for i in after.overlap] == [before.id]
    assert (ca_dir / CURRENT_FILE).read_text().strip() == done.new_id
    # the first layout's files and the staged pair are gone; the keys are 0600
    for name in (INTERMEDIATE_KEY, INTERMEDIATE_CERT, NEXT_KEY, NEXT_CERT):
        assert not (ca_dir / name).exists(), name
    for key in (ca_dir / INTERMEDIATES_DIR).glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0
    assert not list(ca_dir.rglob("root.key*"))
    new_cert = after.sign_csr(make_csr()[0], DEVICE)
    assert issuer_id(new_cert) == done.new_id
    # both chain to the root through their own intermediate, neither through the other
    root = root_dir / ROOT_CERT
    assert openssl_verifies(tmp_path, root, [new_cert, after.cert])
    assert openssl_verifies(tmp_path, root, [old_cert, before.cert])
    assert not openssl_verifies(tmp_path, root, [new_cert, before.cert])
    # the broker's trust: both intermediates and the root; a CRL of each, the old one's
    # entries kept, each signed by its own intermediate
    bundle = x509.load_pem_x509_certificates((ca_dir / BROKER_BUNDLE).read_bytes())
    assert {c.subject for c in bundle} == {before.cert.subject, after.cert.subject,
                                           after.root.subject}
    crls = {c.issuer: c for c in load_crls(after.crl_path.read_bytes())}
    assert set(crls) == {before.cert.subject, after.cert.subject}
    assert crls[before.cert.subject].is_signature_valid(before.cert.public_key())
    assert crls[after.cert.subject].is_signature_valid(after.cert.public_key())
    assert [e.serial_number for e in crls[before.cert.subject]] == [0xABC]
    # a device trusts the root alone; a device's chain names its own issuer
    assert after.device_trust_pem() == after.root_pem()
    assert after.chain_pem(before.id) == _pem(before.cert).decode()
    assert after.chain_pem(done.new_id) == after.chain_pem() == _pem(after.cert).decode()


def test_crls_of_both_intermediates_list_every_revoked_serial(
        dirs: tuple[Path, Path]) -> None:
    root_dir, ca_dir = dirs
    first = CertificateAuthority(ca_dir)
    first.write_crl([Revoked(3, first.cert.not_valid_before_utc)], 3600)
    rollover(root_dir, ca_dir)
    ca = CertificateAuthority(ca_dir)
    assert ca.crl_serials() is None  # the new one's CRL is empty, the old one's is not
    now = ca.cert.not_valid_before_utc
    ca.write_crl([Revoked(5, now), Revoked(7, now, on_hold=True)], 3600)
    assert ca.crl_serials() == {5, 7} and not ca.crl_due()
    assert len(load_crls(ca.crl_path.read_bytes())) == 2
    ca.crl_path.write_bytes(ca.make_crl([], 3600))  # the new intermediate's CRL alone
    assert ca.crl_due() and ca.crl_serials() is None


def test_a_running_service_signs_with_the_new_intermediate_at_once(
        dirs: tuple[Path, Path]) -> None:
    root_dir, ca_dir = dirs
    first = load_current(ca_dir)
    assert load_current(ca_dir) is first  # unchanged directory: the same object
    done = rollover(root_dir, ca_dir)
    now = load_current(ca_dir)
    assert now is not first and now.id == done.new_id


def test_refusals_name_what_is_wrong(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    root_dir, ca_dir = dirs
    # no root key here: the CLI says where to run it, exit 1, no traceback
    bare = tmp_path / "no-root"
    bare.mkdir()
    shutil.copy(root_dir / ROOT_CERT, bare / ROOT_CERT)
    r = subprocess.run([sys.executable, "-m", "cityedge.cli", "ca", "rollover", "--root-dir",
                        str(bare), "--ca-dir", str(ca_dir)], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("cityedge: no root key at ") and "Traceback" not in r.stderr
    assert "where the offline root lives" in r.stderr
    # a root key that is not the root certificate's
    other = tmp_path / "other"
    init_ca(other / "root", other / "ca")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(other / "root" / ROOT_KEY, mixed / ROOT_KEY)
    shutil.copy(root_dir / ROOT_CERT, mixed / ROOT_CERT)
    with pytest.raises(RolloverRefused, match="does not match the root certificate"):
        rollover(mixed, ca_dir)
    # another root's CA directory
    with pytest.raises(RolloverRefused, match="belongs to another root"):
        rollover(other / "root", ca_dir)
    assert CertificateAuthority(ca_dir).overlap == []  # nothing changed
    # one rollover at a time
    done = rollover(root_dir, ca_dir)
    with pytest.raises(RolloverRefused, match="still in service") as e:
        rollover(root_dir, ca_dir)
    assert "intermediate=%s" % done.old_id in (e.value.hint or "")


class Cut(Exception):
    """The simulated crash."""


def _cutting(monkeypatch: pytest.MonkeyPatch, at: int | None) -> list[str]:
    """Make the rollover's file operations count, and the ``at``-th one crash."""
    done: list[str] = []

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(path: Path, *a: Any, **k: Any) -> Any:
            if at is not None and len(done) == at:
                raise Cut("%s %s" % (name, path.name))
            done.append("%s %s" % (name, path.name))
            return fn(path, *a, **k)
        return op

    monkeypatch.setattr(ca_rollover, "write_atomic", wrap("write", ca_rollover.write_atomic))
    real_remove = ca_rollover.remove
    monkeypatch.setattr(ca_rollover, "remove", wrap("remove", real_remove))
    return done


@pytest.fixture
def pristine(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    init_ca(tmp_path / "root", tmp_path / "pristine")
    yield tmp_path / "root", tmp_path / "pristine"


def test_a_rollover_cut_at_every_file_operation_leaves_a_ca_that_signs(
        pristine: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root_dir, source = pristine
    old_id = CertificateAuthority(source).id
    with monkeypatch.context() as m:
        probe = tmp_path / "probe"
        shutil.copytree(source, probe)
        ops = _cutting(m, None)
        rollover(root_dir, probe)
    assert len(ops) >= 12, ops  # migration, staging, trust, switch, clean-up
    for at in range(len(ops)):
        ca_dir = tmp_path / ("cut%d" % at)
        shutil.copytree(source, ca_dir)
        with monkeypatch.context() as m:
            _cutting(m, at)
            with pytest.raises(Cut):
                rollover(root_dir, ca_dir)
        signer = signs_and_chains(ca_dir, root_dir, tmp_path)  # the CA still signs
        staged = ca_rollover._staged(ca_dir, CertificateAuthority(ca_dir).root)
        try:
            done = rollover(root_dir, ca_dir)  # run again: it completes
            new_id = done.new_id
            assert done.old_id == old_id
        except RolloverRefused as e:  # the cut came after the switch: it was complete
            assert "still in service" in str(e) and signer != old_id, (at, ops[at])
            new_id = signer
        if staged is not None:
            assert new_id == staged.id, (at, ops[at])  # no second new intermediate
        ca = CertificateAuthority(ca_dir)
        assert ca.id == new_id and [i.id for i in ca.overlap] == [old_id], (at, ops[at])
        assert sorted(p.name for p in (ca_dir / INTERMEDIATES_DIR).iterdir()) == sorted(
            [old_id + ".crt", old_id + ".key", new_id + ".crt", new_id + ".key"])
        for name in (INTERMEDIATE_KEY, INTERMEDIATE_CERT, NEXT_KEY, NEXT_CERT):
            assert not (ca_dir / name).exists(), (at, ops[at], name)
        assert not list(ca_dir.glob("*.tmp"))
        signs_and_chains(ca_dir, root_dir, tmp_path)
        crls = load_crls(ca.crl_path.read_bytes())
        assert {c.issuer for c in crls} == {i.cert.subject for i in ca.intermediates}


def test_a_retirement_cut_at_every_file_operation_signs_and_finishes_when_run_again(
        pristine: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlmodel import Session

    from cityedge_fleet import ca as ca_module
    from cityedge_fleet import ca_retire
    from cityedge_fleet.ca import RETIRED_DIR
    from cityedge_fleet.config import Settings
    from cityedge_fleet.db import make_engine, migrate

    root_dir, source = pristine
    rollover(root_dir, source)
    old_id = CertificateAuthority(source).overlap[0].id

    def cutting(m: pytest.MonkeyPatch, at: int | None) -> list[str]:
        ops: list[str] = []

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def op(path: Path, *a: Any, **k: Any) -> Any:
                if at is not None and len(ops) == at:
                    raise Cut(path.name)
                ops.append(path.name)
                return fn(path, *a, **k)
            return op

        for module in (ca_module, ca_retire):
            m.setattr(module, "write_atomic", wrap(module.write_atomic))
        m.setattr(ca_retire, "remove", wrap(ca_retire.remove))
        m.setattr(ca_rollover, "remove", wrap(ca_rollover.remove))
        return ops

    def settings(ca_dir: Path) -> Settings:
        return Settings(mode="development", ca_dir=ca_dir,
                        database_url="sqlite:///%s" % (ca_dir.parent / (ca_dir.name + ".db")),
                        audit_key_file=tmp_path / "audit.key",
                        command_key_file=tmp_path / "command.key")

    def run(ca_dir: Path) -> None:
        engine = make_engine(settings(ca_dir), create=True)
        migrate(engine, create=True)
        try:
            with Session(engine) as session:
                ca_retire.retire(session, ca_dir, settings(ca_dir), by="test")
        finally:
            engine.dispose()

    with monkeypatch.context() as m:
        probe = tmp_path / "r-probe"
        shutil.copytree(source, probe)
        ops = cutting(m, None)
        run(probe)
    assert ops == [old_id + ".crt", old_id + ".crt", old_id + ".key", BROKER_BUNDLE,
                   "crl.pem"], ops
    for at in range(len(ops)):
        ca_dir = tmp_path / ("r-cut%d" % at)
        shutil.copytree(source, ca_dir)
        with monkeypatch.context() as m:
            cutting(m, at)
            with pytest.raises(Cut):
                run(ca_dir)
        signs_and_chains(ca_dir, root_dir, tmp_path)  # the CA still signs
        run(ca_dir)  # run again: it finishes
        ca = CertificateAuthority(ca_dir)
        assert ca.overlap == [] and (ca_dir / RETIRED_DIR / (old_id + ".crt")).is_file()
        assert sorted(p.name for p in (ca_dir / INTERMEDIATES_DIR).iterdir()) == [
            ca.id + ".crt", ca.id + ".key"], at
        assert [c.issuer for c in load_crls(ca.crl_path.read_bytes())] == [ca.cert.subject]
        assert x509.load_pem_x509_certificates((ca_dir / BROKER_BUNDLE).read_bytes()) == [
            ca.cert, ca.root]
