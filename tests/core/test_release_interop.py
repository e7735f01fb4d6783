"""Release files read by an independent COSE implementation (pycose) both ways: our key
list (COSE_Sign) and manifest (COSE_Sign1) verify with pycose, with the external AAD each
is signed under; a list and a manifest pycose makes verify with ours."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message, SignMessage
from pycose.messages.signer import CoseSignature

from cityedge_core import cbor, release_keys, update_manifest
from cityedge_core.update_manifest import MANIFEST_AAD, Manifest
from cityedge_host import release
from cityedge_host.crypto import EcSigner, public_sec1

NOW = 1_800_000_000


def _key(signer: EcSigner, private: bool = False) -> EC2Key:
    nums = signer.public_key.public_numbers()
    kw = {"crv": P256, "x": nums.x.to_bytes(32, "big"), "y": nums.y.to_bytes(32, "big")}
    if private:
        priv = signer._key  # the test's own key: pycose needs d to sign
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        kw["d"] = priv.private_numbers().private_value.to_bytes(32, "big")
    return EC2Key(**kw)


def _setup(tmp_path: Path) -> tuple[list[EcSigner], release.RootSet, EcSigner, Path]:
    roots = [EcSigner.generate() for _ in range(3)]
    rs = release.RootSet(2, [public_sec1(r.public_key) for r in roots])
    rel = EcSigner.generate()
    artifact = tmp_path / "gateway.tar"
    artifact.write_bytes(b"wheels" * 1000)
    return roots, rs, rel, artifact


def test_pycose_verifies_our_key_list_and_manifest(tmp_path: Path) -> None:
    roots, rs, rel, artifact = _setup(tmp_path)
    data = release.certify(rs, roots[:2], [release.CertifiedKey(
        public_sec1(rel.public_key), ["gateway"], NOW + 86400)], version=3)
    data = release.cosign(data, roots[2], rs)
    msg = SignMessage.decode(data)
    assert len(msg.signers) == 3
    by_kid = {r.kid: r for r in roots}
    for signer in msg.signers:
        signer.key = _key(by_kid[signer.phdr[KID]])
        signer.external_aad = release_keys.LIST_AAD
        assert signer.verify_signature()
        signer.external_aad = b""  # the AAD is part of what was signed
        assert not signer.verify_signature()
    payload = cbor.loads(msg.payload)
    assert payload[release_keys.L_VERSION] == 3

    manifest = release.sign_release(rel, artifact, "gateway", "2.0.1", 9, ["pi4"], NOW + 60)
    m = Sign1Message.decode(manifest)
    m.key = _key(rel)
    m.external_aad = MANIFEST_AAD
    assert m.verify_signature() and m.phdr[KID] == rel.kid
    assert cbor.loads(m.payload)[update_manifest.M_SHA256] == hashlib.sha256(
        artifact.read_bytes()).digest()


def test_a_list_and_a_manifest_made_by_pycose_verify_with_ours(tmp_path: Path) -> None:
    roots, rs, rel, artifact = _setup(tmp_path)
    payload = cbor.dumps(release_keys.payload_map(
        1, 2, rs.kids, [(public_sec1(rel.public_key), ["gateway"], NOW + 86400)]))
    signers = [CoseSignature(phdr={Algorithm: Es256, KID: r.kid}, key=_key(r, True),
                             external_aad=release_keys.LIST_AAD) for r in roots[1:]]
    data = SignMessage(payload=payload, signers=signers).encode()

    size, digest = release.hash_file(artifact)
    body = Manifest("gateway", "2.0.1", 9, ["pi4"], size, digest, NOW + 60).encode()
    one = Sign1Message(phdr={Algorithm: Es256}, uhdr={KID: rel.kid}, payload=body,
                       key=_key(rel, True), external_aad=MANIFEST_AAD).encode()
    report = release.verify_release(rs, data, one, artifact, hw_class="pi4",
                                    installed_seq=8, now=NOW)
    assert report.ok, report.lines
    assert report.verdict.keys.signed_by == [r.kid for r in roots[1:]]
    # the same manifest from pycose without our AAD is refused by ours
    plain = Sign1Message(phdr={Algorithm: Es256, KID: rel.kid}, payload=body,
                         key=_key(rel, True)).encode()
    report = release.verify_release(rs, data, plain, artifact, now=NOW)
    assert (report.ok, report.reason) == (False, "bad_signature")
