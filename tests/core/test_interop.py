"""Interoperability with independent implementations: pycose both ways, OpenSSL, cbor2."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message

from cityedge_core import batch as batchmod
from cityedge_core import chain, cose, p256
from cityedge_host.crypto import EcSigner, EcVerifier, public_sec1

from helpers import DEVICE, ROOT, records, run_micropython

D = 0x5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E5A1E
VECTORS = ROOT.parent / "shared" / "vectors"


def _pycose_key(pub: ec.EllipticCurvePublicKey, d: int | None = None) -> EC2Key:
    nums = pub.public_numbers()
    kw = {"crv": P256, "x": nums.x.to_bytes(32, "big"), "y": nums.y.to_bytes(32, "big")}
    if d is not None:
        kw["d"] = d.to_bytes(32, "big")
    return EC2Key(**kw)


def _pycose_verifies(data: bytes, pub: ec.EllipticCurvePublicKey) -> bool:
    msg = Sign1Message.decode(data)
    msg.key = _pycose_key(pub)
    return bool(msg.verify_signature())


def test_pycose_verifies_cpython_signed_batch() -> None:
    signer = EcSigner.generate()
    data = batchmod.BatchWriter(DEVICE, signer, signer.kid).sign(records(50), boot=1)
    assert _pycose_verifies(data, signer.public_key)
    assert Sign1Message.decode(data).payload == cose.decode_sign1(data).payload


def test_pycose_verifies_micropython_signed_batch(core_mpy: Path) -> None:
    out = run_micropython(
        "from cityedge_core import batch, p256, cose, senml\n"
        "import binascii\n"
        "k = p256.PrivateKey(%d)\n"
        "kid = cose.kid_for_public_key(k.public_key().to_sec1())\n"
        "w = batch.BatchWriter(%r, k, kid)\n"
        "recs = [{senml.BN: %r, senml.BT: 1700000000, senml.N: 'temp', senml.V: 21.5}]\n"
        "for i in range(1, 50): recs.append({senml.N: 'temp', senml.T: i, senml.V: 20 + i / 8})\n"
        "w.sign(recs, 3)\n"
        "s = w.sign(recs, 3)\n"
        "recs = None\n"
        "for i in range(0, len(s), 128): print(binascii.hexlify(s[i:i + 128]).decode(), end='')\n"
        % (D, DEVICE, DEVICE + ":"),
        heap="64k",
        core_dir=core_mpy,
    )
    data = bytes.fromhex(out.strip())
    pub = ec.derive_private_key(D, ec.SECP256R1()).public_key()
    assert _pycose_verifies(data, pub)
    # and CPython's own verifier agrees, with the chain position the device used
    v = EcVerifier(pub)
    verifier = chain.BatchVerifier({v.kid: chain.KeyEntry(DEVICE, v)})
    verdict = verifier.check(data)
    assert (verdict.status, verdict.missing, verdict.batch.seq) == (chain.GAP, 1, 2)


def test_we_verify_pycose_signed_batches() -> None:
    priv = ec.generate_private_key(ec.SECP256R1())
    pub = priv.public_key()
    kid = cose.kid_for_public_key(public_sec1(pub))
    verifier = chain.BatchVerifier({kid: chain.KeyEntry(DEVICE, EcVerifier(pub))})
    prev = batchmod.ZERO_HASH
    for seq in (1, 2, 3):
        payload = batchmod.Batch(DEVICE, seq, prev, 1, records(10)).encode()
        msg = Sign1Message(phdr={Algorithm: Es256, KID: kid}, payload=payload)
        msg.key = _pycose_key(pub, priv.private_numbers().private_value)
        data = msg.encode()
        assert verifier.check(data).status == chain.OK
        prev = batchmod.batch_hash(data)
    # pure-Python verifier too
    pure = p256.PublicKey.from_sec1(public_sec1(pub))
    cose.decode_sign1(data).verify(pure)


def test_wycheproof_p1363_openssl_and_pure_python_agree() -> None:
    doc = json.loads((VECTORS / "wycheproof/testvectors_v1/ecdsa_secp256r1_sha256_p1363_test.json")
                     .read_text())
    total = 0
    for group in doc["testGroups"]:
        point = bytes.fromhex(group["publicKey"]["uncompressed"])
        ossl = EcVerifier.from_sec1(point)
        pure = p256.PublicKey.from_sec1(point)
        for t in group["tests"]:
            msg, sig = bytes.fromhex(t["msg"]), bytes.fromhex(t["sig"])
            expected = t["result"] == "valid"
            assert ossl.verify(msg, sig) == expected, t["tcId"]
            assert pure.verify(msg, sig) == expected, t["tcId"]
            total += 1
    assert total == 262


def test_pure_python_signatures_verify_with_openssl() -> None:
    for d in (1, 2, 0xDEADBEEF, p256.N - 1, D):
        key = p256.PrivateKey(d)
        sig = key.sign(b"cityedge")
        ossl = EcVerifier.from_sec1(key.public_key().to_sec1())
        assert ossl.verify(b"cityedge", sig)
        assert not ossl.verify(b"cityedgf", sig)
