"""Pure-Python P-256 ECDSA: RFC 6979 vector, Wycheproof P1363 vectors, key validation."""

import hashlib

from cityedge_core import p256
from cityedge_core.errors import SignatureError

from .vectors import load_json, unhex

# RFC 6979 A.2.5, P-256 with SHA-256, message "sample"
_D = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
_K = 0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60
_SIG = (
    "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716"
    "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"
)


def test_rfc6979_sample_vector():
    key = p256.PrivateKey(_D)
    assert key.public_key().x == _UX
    assert next(p256.rfc6979_nonces(_D, hashlib.sha256(b"sample").digest())) == _K
    assert key.sign(b"sample") == unhex(_SIG)
    assert key.public_key().verify(b"sample", unhex(_SIG))
    assert not key.public_key().verify(b"sample!", unhex(_SIG))


def test_edge_keys_sign_and_verify():
    # d = n - 1 makes Q = -G: verification's table holds G + Q = infinity
    for d in (1, 2, p256.N - 2, p256.N - 1):
        key = p256.PrivateKey(d)
        for msg in (b"a", b"sample"):
            sig = key.sign(msg)
            assert key.public_key().verify(msg, sig)
            assert not key.public_key().verify(msg + b"!", sig)


def test_invalid_public_keys_are_refused():
    good = p256.PrivateKey(_D).public_key().to_sec1()
    bad = bytearray(good)
    bad[64] ^= 1  # y off by one bit: not on the curve
    for point in (bytes(bad), good[:64], b"\x02" + good[1:33], bytes(65)):
        try:
            p256.PublicKey.from_sec1(point)
        except SignatureError:
            continue
        raise AssertionError("accepted an invalid point")


def wycheproof_results(limit=None):
    """(tcId, expected, got) for each P1363 vector, via the pure-Python verifier."""
    doc = load_json("wycheproof/testvectors_v1/ecdsa_secp256r1_sha256_p1363_test.json")
    out = []
    for group in doc["testGroups"]:
        try:
            pub = p256.PublicKey.from_sec1(unhex(group["publicKey"]["uncompressed"]))
        except SignatureError:
            pub = None
        for t in group["tests"]:
            got = pub is not None and pub.verify(unhex(t["msg"]), unhex(t["sig"]))
            out.append((t["tcId"], t["result"] == "valid", got))
            if limit is not None and len(out) >= limit:
                return out
    return out


def test_wycheproof_p1363_all_match():
    results = wycheproof_results()
    wrong = [r[0] for r in results if r[1] != r[2]]
    assert not wrong, wrong
    assert len(results) == 262
