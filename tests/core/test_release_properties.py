"""Release trust, properties and the verdict table (CPython; OpenSSL keys so hypothesis
can sign many): manifests and key lists round-trip; every single-byte change of a signed
manifest or key list is refused; each row of ``check_update``'s table gives its reason;
``ArtifactHasher`` never takes a byte past the size and accepts only the exact artifact."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import cbor, cose, release_keys, update_manifest
from cityedge_core.update_manifest import Manifest
from cityedge_host.crypto import EcSigner, EcVerifier, public_sec1
from cityedge_host.release import sec1_verifier

NOW = 1_800_000_000
ARTIFACT = b"firmware image " * 100
ROOTS = [EcSigner.generate() for _ in range(3)]
TRUST = {r.kid: r.verifier() for r in ROOTS}
RELEASE = EcSigner.generate()
GATEWAY_ONLY = EcSigner.generate()
COMMAND_KEY = EcSigner.generate()  # the fleet's command key: a P-256 key devices trust


def key_list(signers: list[EcSigner] | None = None, version: int = 1, threshold: int = 2,
             keys: list[tuple[EcSigner, list[str], int]] | None = None,
             roots: list[bytes] | None = None) -> bytes:
    if keys is None:
        keys = [(RELEASE, ["device-firmware"], NOW + 86400),
                (GATEWAY_ONLY, ["gateway"], NOW + 86400)]
    payload = cbor.dumps(release_keys.payload_map(
        version, threshold, roots or [r.kid for r in ROOTS],
        [(public_sec1(s.public_key), roles, exp) for s, roles, exp in keys]))
    sigs = []
    for s in ROOTS[:2] if signers is None else signers:
        prot = release_keys.sign_protected(s.kid)
        sigs.append((prot, s.sign(release_keys.signature_structure(b"", prot, payload))))
    return release_keys.encode_list(payload, sigs)


def manifest(signer: EcSigner = RELEASE, **kw: Any) -> bytes:
    fields: dict[str, Any] = dict(
        component="device-firmware", version="1.2.0", sequence=5,
        hw_classes=["esp32-s3", "esp32"], size=len(ARTIFACT),
        sha256=hashlib.sha256(ARTIFACT).digest(), expires=NOW + 3600)
    fields.update(kw)
    return update_manifest.sign_manifest(Manifest(**fields), signer, signer.kid)


GOOD_LIST = key_list()
GOOD_MANIFEST = manifest()


@dataclass
class Case:
    """One device situation; ``check`` runs the core's policy on it."""

    manifest: bytes = GOOD_MANIFEST
    keys: bytes = GOOD_LIST
    keys_version: int = 1
    installed_seq: int = 4
    installed_version: str | None = "1.1.0"
    now: int | None = NOW
    component: str = "device-firmware"
    hw_class: str = "esp32"
    budget: int | None = 1 << 20
    threshold: int = 2
    roots: dict[bytes, EcVerifier] = field(default_factory=lambda: dict(TRUST))

    def check(self) -> update_manifest.Verdict:
        return update_manifest.check_update(
            self.manifest, self.keys, self.roots, self.threshold, self.keys_version,
            self.component, self.hw_class, self.installed_seq, self.installed_version,
            self.now, self.budget, sec1_verifier)


def _swap_payload(data: bytes, payload: bytes) -> bytes:
    """A list with another payload but the original signatures (a forger's edit)."""
    obj = cbor.loads(data)
    obj.value[2] = payload
    return cbor.dumps(obj)


# The verdict table: situation -> the reason the core gives (first failing rule).
TABLE: list[tuple[str, Callable[[], Case], str]] = [
    ("a good release", lambda: Case(), "ok"),
    ("a newer key list than stored", lambda: Case(keys_version=0), "ok"),
    ("a factory install (nothing installed)",
     lambda: Case(installed_seq=0, installed_version=None), "ok"),
    ("all three roots signed", lambda: Case(keys=key_list(ROOTS)), "ok"),
    ("the key list is not COSE", lambda: Case(keys=b"\xa0"), "keys_malformed"),
    ("the key list is a COSE_Sign1", lambda: Case(keys=GOOD_MANIFEST), "keys_malformed"),
    ("one root of two", lambda: Case(keys=key_list(ROOTS[:1])), "keys_threshold"),
    ("one root twice", lambda: Case(keys=key_list([ROOTS[0], ROOTS[0]])), "keys_threshold"),
    ("signed by the release key and a root",
     lambda: Case(keys=key_list([ROOTS[0], RELEASE])), "keys_threshold"),
    ("the list lowers the threshold to 1",
     lambda: Case(keys=key_list(ROOTS[:1], threshold=1)), "keys_threshold"),
    ("the list names a root the device does not trust",
     lambda: Case(keys=key_list(roots=[r.kid for r in ROOTS[:2]] + [RELEASE.kid])),
     "keys_threshold"),
    ("a payload swapped under valid signatures",
     lambda: Case(keys=_swap_payload(GOOD_LIST, cbor.dumps(release_keys.payload_map(
         1, 2, [r.kid for r in ROOTS],
         [(public_sec1(COMMAND_KEY.public_key), ["device-firmware"], NOW + 86400)])))),
     "keys_threshold"),
    ("an older key list than stored", lambda: Case(keys_version=2), "keys_rollback"),
    ("the manifest is not COSE", lambda: Case(manifest=b"\x00"), "malformed"),
    ("signed by the fleet's command key", lambda: Case(manifest=manifest(COMMAND_KEY)),
     "unknown_key"),
    ("signed by a root key", lambda: Case(manifest=manifest(ROOTS[0])), "unknown_key"),
    ("signed by a revoked release key", lambda: Case(
        keys=key_list(version=2, keys=[(GATEWAY_ONLY, ["gateway"], NOW + 86400)])),
     "unknown_key"),
    ("signed without the manifest AAD", lambda: Case(manifest=cose.encode_sign1(
        cose.decode_sign1(GOOD_MANIFEST).payload, RELEASE, RELEASE.kid)), "bad_signature"),
    ("a gateway key signs firmware", lambda: Case(manifest=manifest(GATEWAY_ONLY)),
     "wrong_role"),
    ("a gateway release to a device", lambda: Case(
        manifest=manifest(GATEWAY_ONLY, component="gateway")), "wrong_component"),
    ("another hardware class", lambda: Case(hw_class="rp2-pico-w"), "wrong_hw_class"),
    ("no trusted clock", lambda: Case(now=None), "no_clock"),
    ("the release key expired", lambda: Case(now=NOW + 86400), "key_expired"),
    ("the manifest expired", lambda: Case(now=NOW + 3600), "expired"),
    ("an older sequence", lambda: Case(installed_seq=6), "rollback"),
    ("the installed sequence again", lambda: Case(installed_seq=5), "replay"),
    ("installed version below min_version",
     lambda: Case(manifest=manifest(min_version="1.1.5")), "too_old_installed"),
    ("installed version at min_version",
     lambda: Case(manifest=manifest(min_version="1.1")), "ok"),
    ("larger than the flash budget", lambda: Case(budget=len(ARTIFACT) - 1), "too_large"),
    ("outside the install window", lambda: Case(
        manifest=manifest(windows=[((NOW // 60 + 10) % 1440, (NOW // 60 + 20) % 1440)])),
     "outside_window"),
    ("inside a window that wraps midnight", lambda: Case(
        manifest=manifest(windows=[((NOW // 60 - 5) % 1440, 1)])), "ok"),
]


@pytest.mark.parametrize(("situation", "case", "reason"), TABLE, ids=[t[0] for t in TABLE])
def test_the_verdict_table(situation: str, case: Callable[[], Case], reason: str) -> None:
    verdict = case().check()
    assert verdict.reason == reason, (situation, verdict)
    assert verdict.ok == (reason == "ok")
    assert verdict.wait == (reason in ("no_clock", "outside_window"))
    if reason not in ("ok", "malformed") and not reason.startswith("keys_"):
        assert verdict.kid is not None  # the key it named is reported


def test_a_taken_list_is_reported_for_persisting() -> None:
    verdict = Case(keys=key_list(version=7), keys_version=3).check()
    assert verdict.ok and verdict.keys.version == 7 and len(verdict.keys.signed_by) == 2


# -- properties ----------------------------------------------------------------------------

versions = st.lists(st.integers(0, 999_999), min_size=1, max_size=4).map(
    lambda p: ".".join(map(str, p)))
classes = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=32)
windows = st.lists(st.tuples(st.integers(0, 1439), st.integers(0, 1439)).filter(
    lambda w: w[0] != w[1]), min_size=1, max_size=8)
manifests = st.builds(
    Manifest,
    component=st.sampled_from(release_keys.ROLES), version=versions,
    sequence=st.integers(1, update_manifest.SEQ_MAX),
    hw_classes=st.lists(classes, min_size=1, max_size=16, unique=True),
    size=st.integers(1, update_manifest.ARTIFACT_MAX_BYTES),
    sha256=st.binary(min_size=32, max_size=32), expires=st.integers(0, 0xFFFFFFFFFF),
    min_version=st.none() | versions, windows=st.none() | windows)


@given(manifests)
def test_a_manifest_round_trips(m: Manifest) -> None:
    signed = update_manifest.sign_manifest(m, RELEASE, RELEASE.kid)
    assert len(signed) <= update_manifest.MANIFEST_MAX_BYTES
    back = update_manifest.decode_payload(cose.decode_sign1(signed).payload)
    assert back.to_map() == m.to_map()
    assert back.encode() == m.encode()


@given(st.lists(st.tuples(st.sampled_from([RELEASE, GATEWAY_ONLY, COMMAND_KEY]),
                          st.lists(st.sampled_from(release_keys.ROLES), min_size=1,
                                   max_size=2, unique=True),
                          st.integers(0, 0xFFFFFFFFFF)),
                min_size=0, max_size=3, unique_by=lambda t: t[0].kid),
       st.integers(1, release_keys.VERSION_MAX), st.integers(2, 3))
def test_a_key_list_round_trips(keys: list[tuple[EcSigner, list[str], int]], version: int,
                                threshold: int) -> None:
    data = key_list(ROOTS[:threshold], version, threshold, keys)
    taken = release_keys.verify_list(data, TRUST, 2, version, sec1_verifier)
    assert (taken.version, taken.threshold) == (version, threshold)
    assert taken.roots == [r.kid for r in ROOTS]
    assert {k: (v.roles, v.expires) for k, v in taken.keys.items()} == {
        s.kid: (tuple(roles), exp) for s, roles, exp in keys}
    assert sorted(taken.signed_by) == sorted(r.kid for r in ROOTS[:threshold])


def _mutations(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for x in (0x01, 0x80, 0xFF):
            b = bytearray(data)
            b[i] ^= x
            out.append(bytes(b))
    return out


def test_every_single_byte_change_of_a_manifest_is_refused() -> None:
    for bad in _mutations(GOOD_MANIFEST):
        verdict = Case(manifest=bad).check()
        assert verdict.reason in ("malformed", "unknown_key", "bad_signature"), (
            bad.hex(), verdict)


def test_every_single_byte_change_of_a_key_list_is_refused() -> None:
    for bad in _mutations(GOOD_LIST):
        verdict = Case(keys=bad).check()
        assert verdict.reason.startswith("keys_") or verdict.reason == "unknown_key", (
            bad.hex(), verdict)


@given(st.binary(max_size=300))
def test_garbage_never_escapes_the_verdicts(data: bytes) -> None:
    assert Case(manifest=data).check().reason == "malformed"
    assert Case(keys=data).check().reason == "keys_malformed"


@settings(max_examples=50)
@given(st.lists(st.integers(1, 700), max_size=40), st.integers(0, 2000))
def test_the_hasher_takes_nothing_past_the_size(chunks: list[int], extra: int) -> None:
    artifact = ARTIFACT + bytes(extra)
    h = update_manifest.ArtifactHasher(len(ARTIFACT), hashlib.sha256(ARTIFACT).digest())
    pos = 0
    refused = False
    for n in [*chunks, len(artifact)]:
        chunk = artifact[pos:pos + n]
        try:
            h.feed(chunk)
        except update_manifest.Refused as e:
            assert e.reason == "artifact_too_long"
            assert pos + len(chunk) > len(ARTIFACT)
            refused = True
            break
        pos += len(chunk)
        assert h.received == pos <= len(ARTIFACT)
    if extra:
        assert refused
    else:
        assert not refused
        h.finish()


@given(st.data())
def test_any_byte_replaced_anywhere_is_refused(data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(["manifest", "keys"]))
    good = GOOD_MANIFEST if target == "manifest" else GOOD_LIST
    i = data.draw(st.integers(0, len(good) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != good[i]))
    bad = good[:i] + bytes((value,)) + good[i + 1:]
    verdict = (Case(manifest=bad) if target == "manifest" else Case(keys=bad)).check()
    assert not verdict.ok and not verdict.wait, verdict
