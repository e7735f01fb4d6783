"""The CPython verify path piece by piece against the core: DER signatures, SenML fast loop,
whole-verifier verdicts on sequences of real and altered batches."""

from __future__ import annotations

from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import batch as batchmod
from cityedge_core import chain, limits, p256, senml
from cityedge_core.errors import MalformedError
from cityedge_host import crypto, fastcbor
from cityedge_host.crypto import EcSigner, EcVerifier
from cityedge_host.verify import make_batch_verifier

from helpers import DEVICE, records

N = crypto._N


def test_the_cbor2_c_decoder_is_the_one_in_use() -> None:
    assert cbor2.CBORDecoder.__module__ == "_cbor2"  # the pure-Python one is 5x slower


# --- ES256 signatures: r || s to DER without integers ------------------------------------

scalars_mod_n = st.one_of(st.integers(1, N - 1), st.sampled_from(
    [1, 2, 0x7F, 0x80, 0xFF, 0x100, 2**255 - 1, 2**255, N - 1, 2**248, 2**248 - 1]))


@given(scalars_mod_n, scalars_mod_n)
@settings(max_examples=500)
def test_der_signature_is_what_cryptography_encodes(r: int, s: int) -> None:
    assert crypto._der_signature(r.to_bytes(32, "big"), s.to_bytes(32, "big")) == \
        encode_dss_signature(r, s)


KEY = p256.PrivateKey(0xC17E5EED)
VERIFIER = EcVerifier.from_sec1(KEY.public_key().to_sec1())


@given(st.binary(max_size=40), st.one_of(
    st.just(None), st.binary(min_size=64, max_size=64),
    st.sampled_from([b"", bytes(64), b"\xff" * 64, bytes(32) + b"\x01" * 32,
                     N.to_bytes(32, "big") + b"\x01" * 32, b"\x01" * 32 + N.to_bytes(32, "big"),
                     (N + 1).to_bytes(32, "big") + b"\x01" * 32])),
       st.integers(0, 63), st.integers(1, 255))
@settings(max_examples=60)
def test_verify_agrees_with_the_core_p256(message: bytes, sig: Any, pos: int, flip: int
                                          ) -> None:
    """OpenSSL through ``EcVerifier`` and the core's pure-Python P-256 give the same answer:
    valid, altered and out-of-range signatures (r or s zero, n, above n)."""
    if sig is None:
        good = bytearray(KEY.sign(message))
        if pos % 2:
            good[pos] ^= flip
        sig = bytes(good)
    assert VERIFIER.verify(message, sig) == KEY.public_key().verify(message, sig)


def test_verify_accepts_good_and_refuses_bad_signatures() -> None:
    signer = EcSigner(ec.derive_private_key(0xBEEF, ec.SECP256R1()))
    v = signer.verifier()
    msg = b"Signature1 over some bytes"
    sig = signer.sign(msg)
    assert v.verify(msg, sig)
    assert not v.verify(msg + b"!", sig)
    assert not v.verify(msg, sig[:63])
    assert not v.verify(msg, sig + b"\x00")
    assert not v.verify(msg, bytes(32) + sig[32:])
    assert not v.verify(msg, sig[:32] + N.to_bytes(32, "big"))


# --- SenML: the one-loop check against the per-record rules -------------------------------

labels = st.one_of(
    st.sampled_from([senml.BN, senml.BT, senml.BU, senml.BV, senml.BS, senml.BVER, senml.N,
                     senml.U, senml.V, senml.VS, senml.VB, senml.VD, senml.S, senml.T,
                     senml.UT, 99, -99, "x_", "ext", "", True, False, 1.0, 2.0, 0.5, None,
                     b"n"]))
texts = st.one_of(st.text(max_size=4), st.integers(120, 260).map(lambda n: "é" * n))
values = st.one_of(st.integers(-5, 2**70), st.floats(), texts, st.binary(max_size=4),
                   st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                   st.builds(cbor2.CBORTag, st.just(99), st.integers(0, 3)))
packs = st.one_of(
    st.lists(st.one_of(st.dictionaries(labels, values, max_size=5),
                       st.fixed_dictionaries({senml.N: texts, senml.V: values}),
                       st.integers(), st.lists(st.integers(), max_size=1)), max_size=6),
    st.integers(), st.none(), st.dictionaries(st.integers(), st.integers(), max_size=1))


def verdict(fn: Any, pack: Any) -> Any:
    try:
        fn(pack)
    except MalformedError as e:
        return type(e).__name__
    return "ok"


def record_by_record(pack: Any) -> None:
    if not isinstance(pack, list):
        raise MalformedError("SenML: pack is not an array")
    if len(pack) > limits.BATCH_MAX_RECORDS:
        raise MalformedError("SenML: too many records")
    for rec in pack:
        senml.validate_record(rec)


@given(packs)
@settings(max_examples=1500)
def test_pack_loop_equals_record_by_record(pack: Any) -> None:
    """Labels that hash like known ones (``True``, ``1.0``), text near every cap (in
    characters, not bytes), every value type: the same verdict and the same error kind."""
    fast = verdict(senml.validate_pack, pack)
    slow = verdict(record_by_record, pack)
    assert (fast == "ok") == (slow == "ok"), (fast, slow, pack)


def test_pack_limit_on_records() -> None:
    pack = [{senml.N: "a", senml.V: 1}] * limits.BATCH_MAX_RECORDS
    senml.validate_pack(pack)
    assert verdict(senml.validate_pack, pack + pack[:1]) == "LimitError"


# --- the whole verifier: verdicts on streams of batches ------------------------------------

def _stream(seed: int) -> Any:
    signer = EcSigner(ec.derive_private_key(0xACE0 + seed, ec.SECP256R1()))
    w = batchmod.BatchWriter(DEVICE, signer, signer.kid)
    out = [w.sign(records(n), boot=1) for n in (50, 1, 3, 50, 7, 2)]
    out.append(w.sign(records(2), boot=1, kind=batchmod.KIND_DROP, dropped=[2, 3, 2, 4]))
    ring = {signer.kid: chain.KeyEntry(DEVICE, signer.verifier())}
    return out, ring


@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 6), st.sampled_from(
    ["same", "again", "skip", "flip", "trail", "cut"]), st.integers(0, 10**6)), max_size=12))
@settings(max_examples=120)
def test_fast_verifier_gives_the_core_verdicts(seed: int, plan: list[Any]) -> None:
    """Delivered in any order, repeated, dropped, altered at any byte, with bytes added or
    cut: both verifiers, each with its own chain state, give the same verdicts."""
    batches, ring = _stream(seed)
    core, fast = chain.BatchVerifier(ring), make_batch_verifier(ring)
    for index, how, where in plan:
        data = batches[index]
        if how == "skip":
            continue
        if how == "flip":
            i = where % len(data)
            data = data[:i] + bytes([data[i] ^ (1 + where % 255)]) + data[i + 1:]
        elif how == "trail":
            data = data + b"\x00"
        elif how == "cut":
            data = data[:where % len(data)]
        a, b = core.check(data), fast.check(data)
        assert (a.status, a.missing, a.explained, a.digest, a.kid) == \
            (b.status, b.missing, b.explained, b.digest, b.kid), (index, how, where)
        if a.batch is not None:
            assert a.batch.to_map() == b.batch.to_map()
    assert {d: s.to_list() for d, s in core.states.items()} == \
        {d: s.to_list() for d, s in fast.states.items()}


def test_fast_path_takes_the_layout_and_c_decoder_on_real_batches() -> None:
    """The verdicts above are not the core's fallback in disguise: real batches take the
    byte-layout reader, and their payloads pass cbor2 and ``_check`` with nothing left
    for the core to decide."""
    batches, ring = _stream(0)
    for data in batches:
        msg = fastcbor._sign1_layout(data)
        assert msg is not None
        obj = fastcbor._decode(msg.payload)
        fastcbor._check(obj, 0)  # raises _Unsure where the core would have to decide
        assert make_batch_verifier(ring).check(data).status in chain.ACCEPTED
