"""The gateway's key slots (``key_slots``): a rotation cut at every one of its writes still
leaves an identity whose certificate holds its key, and the rotation completes after.

A cut is the k-th file mutation (an atomic write, an overwrite, an unlink) raising before
it happens, as a power cut would stop the process there; then a fresh ``KeySlots`` opens
the directory as the next boot does. Certificates come from the fleet's own CA code
(``CertificateAuthority.sign_csr``) over the test PKI, so the CSR is checked as the fleet
checks it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cityedge_core import rotation
from cityedge_fleet.ca import CertificateAuthority
from cityedge_gateway import key_slots
from cityedge_gateway.key_slots import Identity, IdentityError, KeySlots
from cityedge_host.crypto import EcSigner, public_sec1

from support.fleet_ca import fleet_ca_from_pki
from support.gateway import GW
from support.mosquitto import TestPKI


class Cut(BaseException):
    """The power went at this write."""


@pytest.fixture
def ca(pki: TestPKI, tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(fleet_ca_from_pki(pki, tmp_path / "ca"))


def sign(ca: CertificateAuthority, csr_der: bytes, device: str = GW) -> bytes:
    pem = x509.load_der_x509_csr(csr_der).public_bytes(serialization.Encoding.PEM)
    return ca.sign_csr(pem, device).public_bytes(serialization.Encoding.DER)


def initial(tmp_path: Path, pki: TestPKI, name: str) -> tuple[Path, Path, EcSigner]:
    """The config's initial identity files: key (0600) and certificate."""
    creds = pki.issue_client(GW)
    d = tmp_path / name
    d.mkdir()
    key, cert = d / "gw.key", d / "gw.crt"
    key.write_bytes(creds.key_pem.read_bytes())
    key.chmod(0o600)
    cert.write_bytes(creds.cert_pem.read_bytes())
    return key, cert, EcSigner(creds.key)


@contextmanager
def cut_at(k: int | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Count the slots' file mutations; the k-th raises ``Cut`` before it happens."""
    done: list[str] = []

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def op(path: Path, *a: Any) -> Any:
            if k is not None and len(done) + 1 == k:
                raise Cut("%s %s" % (name, Path(path).name))
            done.append("%s %s" % (name, Path(path).name))
            return real(path, *a)
        return op

    with monkeypatch.context() as m:
        for name in ("write_atomic", "_overwrite", "_unlink"):
            m.setattr(key_slots, name, counted(name, getattr(key_slots, name)))
        yield done


def rotate(slots: KeySlots, ca: CertificateAuthority, rid: int) -> tuple[Identity, bytes]:
    """The device's three steps as the fleet drives them: (new identity, old kid)."""
    old = slots.load()
    new, csr_der = slots.begin(rid)
    ident = slots.install(rid, sign(ca, csr_der))
    assert ident.kid == new.kid
    assert slots.erase(old.kid)
    return ident, old.kid


def _new_key(slots: KeySlots) -> Any:
    """The pending slot's private key (as the CA's test needs it)."""
    pending = slots.pending()
    assert pending is not None
    return key_slots._load_key(slots.key_file(pending[0]))


def csr_der_for_cn(key: Any, cn: str) -> bytes:
    return key_slots.build_csr(key, cn)


def holds_key(directory: Path, signer: EcSigner) -> list[Path]:
    pem = signer.private_pem()
    return [p for p in directory.rglob("*") if p.is_file() and pem in p.read_bytes()]


def test_a_rotation_cut_at_every_write_boots_and_then_completes(
        tmp_path: Path, pki: TestPKI, ca: CertificateAuthority,
        monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert, _a = initial(tmp_path, pki, "count")
    slots = KeySlots(tmp_path / "count" / "id", GW)
    slots.open(key, cert)
    with cut_at(None, monkeypatch) as writes:
        rotate(slots, ca, 1)
    assert writes == [
        "_unlink cert1.pem", "_overwrite key1.pem", "_unlink key1.pem",
        "write_atomic key1.pem", "write_atomic pending",  # rotate
        "write_atomic cert1.pem", "write_atomic current", "_unlink pending",  # install-cert
        "_overwrite key0.pem", "_unlink key0.pem", "_unlink cert0.pem",  # erase-key
        "_unlink pending"]
    for k in range(1, len(writes) + 1):
        key, cert, a = initial(tmp_path, pki, "cut%d" % k)
        iddir = tmp_path / ("cut%d" % k) / "id"
        KeySlots(iddir, GW).open(key, cert)
        b_kid = None
        with pytest.raises(Cut), cut_at(k, monkeypatch):
            slots = KeySlots(iddir, GW)
            new, csr_der = slots.begin(7)
            b_kid = new.kid
            slots.install(7, sign(ca, csr_der))
            slots.erase(a.kid)
        # the next boot: an identity whose certificate holds its key (open checks the
        # pair), the old one until the pointer moved, the new one after
        boot = KeySlots(iddir, GW)
        ident = boot.open(key, cert)
        moved = writes.index("write_atomic current") < k - 1  # done before the cut
        assert ident.kid == (b_kid if moved else a.kid), k
        leaf = x509.load_pem_x509_certificate(ident.cert_file.read_bytes())
        assert rotation.cert_holds_key(leaf.public_bytes(serialization.Encoding.DER),
                                       public_sec1(ident.signer.public_key))
        # and the rotation completes: the fleet erases the old key (pointer moved) or,
        # having had no answer, starts a new rotation
        if moved:
            if boot.pending() is not None:
                pytest.fail("a pending key after the pointer moved (cut %d)" % k)
            with pytest.raises(IdentityError):
                boot.erase(b_kid)  # type: ignore[arg-type]  # never the current key
            boot.erase(a.kid)
            final = boot.load()
        else:
            final, old = rotate(boot, ca, 8)
            assert old == a.kid
        assert final.kid != a.kid
        assert holds_key(iddir, a) == [], k  # the old key is gone from disk
        assert sorted(p.name for p in iddir.iterdir()) == sorted(
            ["current", "key%d.pem" % final.slot, "cert%d.pem" % final.slot]), k
        assert (final.key_file.stat().st_mode & 0o777) == 0o600


def test_the_first_start_moves_the_initial_identity_into_slot_0_even_if_cut(
        tmp_path: Path, pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert, a = initial(tmp_path, pki, "count")
    with cut_at(None, monkeypatch) as writes:
        KeySlots(tmp_path / "count" / "id", GW).open(key, cert)
    assert writes == ["write_atomic key0.pem", "write_atomic cert0.pem",
                      "write_atomic current", "_unlink gw.key"]
    for k in range(1, len(writes) + 1):
        key, cert, a = initial(tmp_path, pki, "cut%d" % k)
        iddir = tmp_path / ("cut%d" % k) / "id"
        with pytest.raises(Cut), cut_at(k, monkeypatch):
            KeySlots(iddir, GW).open(key, cert)
        ident = KeySlots(iddir, GW).open(key, cert)
        assert (ident.slot, ident.kid) == (0, a.kid)
        assert not key.exists()  # moved: only the slot holds it
        assert holds_key(iddir.parent, a) == [iddir / "key0.pem"]


def test_steps_that_do_not_fit_are_refused_and_change_nothing(
        tmp_path: Path, pki: TestPKI, ca: CertificateAuthority) -> None:
    key, cert, a = initial(tmp_path, pki, "gw")
    slots = KeySlots(tmp_path / "gw" / "id", GW)
    slots.open(key, cert)
    stranger = EcSigner.generate()
    with pytest.raises(IdentityError, match="no key awaits"):
        slots.install(1, sign(ca, key_slots.build_csr(stranger._key, GW)))
    _new, csr_der = slots.begin(3)
    before = {p.name: p.read_bytes() for p in slots.files()}
    with pytest.raises(IdentityError, match="rotation 3, not 4"):
        slots.install(4, sign(ca, csr_der))
    with pytest.raises(IdentityError, match="does not hold the pending key"):
        slots.install(3, sign(ca, key_slots.build_csr(stranger._key, GW)))
    with pytest.raises(IdentityError, match="not one of"):  # its key, another's CN
        slots.install(3, sign(ca, csr_der_for_cn(_new_key(slots), "urn:dev:mac:0024befffe800009"),
                              "urn:dev:mac:0024befffe800009"))
    with pytest.raises(IdentityError, match="current key"):
        slots.erase(a.kid)
    assert not slots.erase(stranger.kid)  # not here: nothing erased
    assert {p.name: p.read_bytes() for p in slots.files()} == before
    assert slots.load().kid == a.kid
