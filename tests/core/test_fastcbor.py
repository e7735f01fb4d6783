"""Differential tests: the cbor2-backed fast path agrees with the core's reference decoder."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import batch as batchmod
from cityedge_core import cbor, chain, cose
from cityedge_core.errors import MalformedError
from cityedge_host import fastcbor
from cityedge_host.crypto import EcSigner
from cityedge_host.verify import make_batch_verifier

from helpers import DEVICE, ROOT, records
from support.cbor_compare import documented_difference, norm, same, values
from support.cbor_compare import same_decoded as same_value

VECTORS = ROOT.parent / "shared" / "vectors" / "cbor-test-vectors"


def outcome(decode: Any, data: bytes) -> Any:
    try:
        return ("ok", decode(data))
    except MalformedError as e:
        return ("malformed", str(e))


@given(values)
def test_agree_on_valid_items(value: Any) -> None:
    data = cbor.dumps(value)
    a, b = cbor.loads(data), fastcbor.loads(data)
    assert same_value(a, norm(b))
    if not isinstance(value, (cbor.Tag, list, dict)):
        assert same(a, b)


def test_pull5_rejections_or_batch_schema_catches_them() -> None:
    """Everything the core rejects is rejected by the fast path, or cannot pass a batch."""
    cases = json.loads((VECTORS / "pull-5" / "fail.json").read_text())
    accepted_by_fast = []
    for case in cases:
        data = bytes.fromhex(case["hex"])
        if outcome(fastcbor.loads, data)[0] == "ok":
            accepted_by_fast.append(case["hex"])
            try:
                batchmod.Batch.from_map(fastcbor.loads_batch_payload(data))
            except MalformedError:
                continue
            raise AssertionError("batch accepted malformed CBOR %s" % case["hex"])
    assert accepted_by_fast == [], accepted_by_fast


def test_same_verdicts_on_batches() -> None:
    signer = EcSigner.generate()
    ring = {signer.kid: chain.KeyEntry(DEVICE, signer.verifier())}
    w = batchmod.BatchWriter(DEVICE, signer, signer.kid)
    data = [w.sign(records(50), boot=1) for _ in range(5)]
    ref = chain.BatchVerifier(ring)
    fast = make_batch_verifier(ring)
    for d in data + data[:2]:
        r, f = ref.check(d), fast.check(d)
        assert (r.status, r.missing) == (f.status, f.missing)
        assert r.batch.to_map() == f.batch.to_map()
    payload = cose.decode_sign1(data[0]).payload
    assert fastcbor.loads(payload) == cbor.loads(payload)


@given(st.binary(max_size=80))
@settings(max_examples=400)
def test_fast_path_never_accepts_trailing_or_truncated(data: bytes) -> None:
    ref = outcome(cbor.loads, data)
    fast = outcome(fastcbor.loads, data)
    if documented_difference(ref, data):
        return
    assert ref[0] == fast[0], data.hex()
    if ref[0] == "ok":
        assert same_value(ref[1], norm(fast[1])), data.hex()


@given(st.binary(max_size=80))
@settings(max_examples=300)
def test_batch_payload_path_rejects_what_the_core_rejects(data: bytes) -> None:
    """Core-malformed payloads never become a Batch through the fast batch path."""
    def to_batch(decode: Any) -> str:
        try:
            batchmod.Batch.from_map(decode(data))
        except MalformedError:
            return "malformed"
        return "ok"

    if to_batch(cbor.loads) == "malformed":
        assert to_batch(fastcbor.loads_batch_payload) == "malformed"


@given(st.lists(st.sampled_from([b"\xf8\x00", b"\xff", b"\xf7", b"\xc1\x01", b"\x80"]),
                min_size=1, max_size=3), st.integers(0, 3))
def test_bad_items_inside_records_are_refused(bad: list[bytes], where: int) -> None:
    rec = {0: "temp", 2: 1.5}
    good = cbor.dumps({1: 0, 2: DEVICE, 3: 1, 4: bytes(32), 5: 1, 6: 0, 7: [rec]})
    # splice a raw item as the value of an unknown field 99 in the record
    enc_rec = cbor.dumps(rec)
    raw = b"".join(bad[:1])
    spliced_rec = bytes([enc_rec[0] + 1]) + enc_rec[1:] + b"\x18\x63" + raw
    data = good.replace(enc_rec, spliced_rec)
    for decode in (cbor.loads, fastcbor.loads_batch_payload):
        try:
            batchmod.Batch.from_map(decode(data))
        except MalformedError:
            continue
        raise AssertionError("accepted %s via %s" % (data.hex(), decode))


@given(st.binary(max_size=120))
@settings(max_examples=300)
def test_envelope_fast_and_core_agree(data: bytes) -> None:
    def kind(decode: Any) -> str:
        try:
            decode(data)
        except MalformedError:
            return "malformed"
        except Exception as e:  # SignatureError for a wrong-length signature
            return type(e).__name__
        return "ok"

    core = kind(cose.decode_sign1)
    assert core == kind(lambda d: cose.decode_sign1(d, loads=fastcbor.loads))
    assert core == kind(fastcbor.decode_sign1)


def test_envelope_fast_and_core_agree_on_mutations() -> None:
    for seed in range(8):  # several keys: what a flipped kid byte turns into varies
        _mutations_agree(seed)


def _mutations_agree(seed: int) -> None:
    signer = EcSigner(ec.derive_private_key(0xC17E + seed, ec.SECP256R1()))
    good = batchmod.BatchWriter(DEVICE, signer, signer.kid).sign(records(3), boot=1)
    ring = {signer.kid: chain.KeyEntry(DEVICE, signer.verifier())}
    for i in range(len(good)):
        for flip in (0x01, 0x80, 0xFF):
            data = bytearray(good)
            data[i] ^= flip
            a = chain.BatchVerifier(ring).check(bytes(data))
            b = make_batch_verifier(ring).check(bytes(data))
            assert (a.status, a.missing) == (b.status, b.missing), (i, flip, a, b)


def test_semantic_tags_cbor2_interprets_get_the_core_verdict_not_crashes() -> None:
    """cbor2 decodes tags 4/5 (decimal fraction, bigfloat), 0/1 (dates) ... itself and its
    own errors escape as TypeError, ValueError ... (found by a fresh hypothesis seed in CI):
    the fast path hands such input to the core, whose verdict it returns."""
    verdicts = []
    for data in (bytes.fromhex("c4824100"), bytes.fromhex("c482616100"),
                 bytes.fromhex("c06161"), bytes.fromhex("c5820000"),
                 bytes.fromhex("c48200f97e00"), bytes.fromhex("c11a514b67b0")):
        ref = outcome(cbor.loads, data)
        verdicts.append(ref[0])
        for loads in (fastcbor.loads, fastcbor.loads_batch_payload):
            fast = outcome(loads, data)
            assert fast[0] == ref[0], (loads.__name__, data.hex())
            if ref[0] == "ok":
                assert same_value(fast[1], ref[1]), (loads.__name__, data.hex())
    assert "ok" in verdicts and "malformed" in verdicts


def test_simple_values_below_32_get_the_core_verdict() -> None:
    """cbor2 cannot tell the one-byte simple values ``e0``..``f3`` (well-formed) from
    ``f800``..``f813`` (not); the fast path asks the core, so both paths agree: a protected
    header or an unknown payload field holding simple(0) is accepted, ``f800`` is not."""
    signer = EcSigner.generate()
    ring = {signer.kid: chain.KeyEntry(DEVICE, signer.verifier())}

    def signed(protected: bytes, payload: bytes) -> bytes:
        sig = signer.sign(cose.sig_structure(protected, payload))
        return cbor.dumps(cbor.Tag(18, [protected, {}, payload, sig]))

    plain = cbor.dumps({cose.HDR_ALG: cose.ALG_ES256, cose.HDR_KID: signer.kid})
    odd = cbor.dumps({cose.HDR_ALG: cose.ALG_ES256, cose.HDR_KID: signer.kid,
                      99: cbor.Simple(0)})
    assert b"\x18\x63\xe0" in odd
    good = batchmod.Batch(DEVICE, 1, batchmod.ZERO_HASH, 1, records(2))
    good.extra = {99: cbor.Simple(0)}
    payload = good.encode()
    assert b"\x18\x63\xe0" in payload
    cases = [(signed(odd, batchmod.Batch(DEVICE, 1, batchmod.ZERO_HASH, 1, records(2))
                     .encode()), chain.OK),
             (signed(plain, payload), chain.OK),
             (signed(plain, payload.replace(b"\x18\x63\xe0", b"\x18\x63\xf8\x00")),
              chain.MALFORMED)]
    for data, status in cases:
        assert chain.BatchVerifier(ring).check(data).status == status
        assert make_batch_verifier(ring).check(data).status == status
