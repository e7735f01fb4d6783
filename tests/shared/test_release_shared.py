"""Release trust on CPython (pytest) and MicroPython (tests/mp/run.py): a release-key list
signed by a threshold of root keys and a manifest signed by a release key, made with the
core alone (pure-Python P-256), checked by ``update_manifest.check_update`` as a device
checks them, and the artifact streamed through ``ArtifactHasher``."""

import hashlib

from cityedge_core import cbor, cose, p256, release_keys, update_manifest
from cityedge_core.update_manifest import Manifest, check_update

ROOTS = [p256.PrivateKey(0x5EED0001 + i) for i in range(3)]
ROOT_KIDS = [cose.kid_for_public_key(k.public_key().to_sec1()) for k in ROOTS]
TRUST = {kid: k.public_key() for kid, k in zip(ROOT_KIDS, ROOTS)}
RELEASE = p256.PrivateKey(0xBEEF0042)
RELEASE_PUB = RELEASE.public_key().to_sec1()
RELEASE_KID = cose.kid_for_public_key(RELEASE_PUB)
NOW = 1_800_000_000
ARTIFACT = bytes(range(256)) * 12
HW = "esp32-s3"


def make_list(signers=(0, 1), version=1, threshold=2, keys=None):
    if keys is None:
        keys = [(RELEASE_PUB, ["device-firmware"], NOW + 86400 * 365)]
    payload = cbor.dumps(release_keys.payload_map(version, threshold, ROOT_KIDS, keys))
    sigs = []
    for i in signers:
        prot = release_keys.sign_protected(ROOT_KIDS[i])
        sigs.append((prot, ROOTS[i].sign(release_keys.signature_structure(b"", prot,
                                                                          payload))))
    return release_keys.encode_list(payload, sigs)


def make_manifest(signer=RELEASE, kid=RELEASE_KID, **kw):
    fields = {"component": "device-firmware", "version": "1.2.0", "sequence": 5,
              "hw_classes": [HW, "esp32"], "size": len(ARTIFACT),
              "sha256": hashlib.sha256(ARTIFACT).digest(), "expires": NOW + 3600}
    fields.update(kw)
    return update_manifest.sign_manifest(Manifest(**fields), signer, kid)


def check(manifest, key_list, keys_version=0, installed_seq=4, now=NOW, hw=HW):
    return check_update(manifest, key_list, TRUST, 2, keys_version, "device-firmware", hw,
                        installed_seq, "1.1.0", now, 1 << 20)


_CACHE = {}


def _cached(name, make):
    if name not in _CACHE:  # pure-Python signatures on MicroPython: made once
        _CACHE[name] = make()
    return _CACHE[name]


def good_list():
    return _cached("list", make_list)


def good_manifest():
    return _cached("manifest", make_manifest)


def test_a_release_signed_under_the_threshold_is_accepted():
    v = check(good_manifest(), good_list())
    assert v.ok, v
    assert v.manifest.sequence == 5 and v.manifest.version == "1.2.0"
    assert v.keys.version == 1 and len(v.keys.signed_by) == 2 and v.kid == RELEASE_KID


def test_one_root_signature_is_not_enough():
    v = check(good_manifest(), _cached("list1", lambda: make_list(signers=(0,))))
    assert v.reason == release_keys.KEYS_THRESHOLD, v


def test_the_same_root_twice_counts_once():
    v = check(good_manifest(), _cached("list00", lambda: make_list(signers=(0, 0))))
    assert v.reason == release_keys.KEYS_THRESHOLD, v


def test_older_and_equal_sequences_are_refused():
    assert check(good_manifest(), good_list(), installed_seq=6).reason == "rollback"
    assert check(good_manifest(), good_list(), installed_seq=5).reason == "replay"


def test_expiry_another_class_and_no_clock():
    assert check(good_manifest(), good_list(), now=NOW + 3600).reason == "expired"
    assert check(good_manifest(), good_list(), hw="rp2-pico-w").reason == "wrong_hw_class"
    v = check(good_manifest(), good_list(), now=None)
    assert v.reason == "no_clock" and v.wait and not v.ok


def test_a_key_list_older_than_the_stored_one_is_refused():
    assert check(good_manifest(), good_list(), keys_version=2).reason == "keys_rollback"


def test_a_manifest_signed_by_a_root_key_is_not_a_release():
    forged = _cached("rootsigned", lambda: make_manifest(signer=ROOTS[0], kid=ROOT_KIDS[0]))
    assert check(forged, good_list()).reason == "unknown_key"


def test_the_artifact_is_streamed_and_checked():
    m = check(good_manifest(), good_list()).manifest
    h = update_manifest.ArtifactHasher(m.size, m.sha256)
    for i in range(0, len(ARTIFACT), 500):
        h.feed(ARTIFACT[i:i + 500])
    h.finish()
    h = update_manifest.ArtifactHasher(m.size, m.sha256)
    h.feed(ARTIFACT)
    try:
        h.feed(b"x")
        raise AssertionError("a byte past the size was taken")
    except update_manifest.Refused as e:
        assert e.reason == "artifact_too_long"
    bad = bytearray(ARTIFACT)
    bad[7] ^= 1
    h = update_manifest.ArtifactHasher(m.size, m.sha256)
    h.feed(bad)
    try:
        h.finish()
        raise AssertionError("a tampered artifact passed")
    except update_manifest.Refused as e:
        assert e.reason == "artifact_digest"


def test_versions_compare_as_numbers():
    pv = update_manifest.parse_version
    assert pv("1.10") > pv("1.9.9") and pv("1.4") == pv("1.4.0.0")
    for bad in ("", "1..2", "1.2.3.4.5", "v1", "1.-2", 3):
        try:
            pv(bad)
            raise AssertionError("accepted %r" % (bad,))
        except update_manifest.Refused:
            pass
