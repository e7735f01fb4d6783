"""Property tests: any bit flip breaks a signed batch; the chain classifier matches a model."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import batch as batchmod
from cityedge_core import cbor, chain, cose, p256, senml
from cityedge_host.crypto import EcSigner

from helpers import DEVICE, records

SIGNER = EcSigner.generate()
RING = {SIGNER.kid: chain.KeyEntry(DEVICE, SIGNER.verifier())}
BATCHES: list[bytes] = []
_w = batchmod.BatchWriter(DEVICE, SIGNER, SIGNER.kid)
for _ in range(40):
    BATCHES.append(_w.sign(records(5), boot=1))


@given(st.integers(0, len(BATCHES[0]) * 8 - 1))
@settings(max_examples=300)
def test_any_bit_flip_fails_verification(bit: int) -> None:
    data = bytearray(BATCHES[0])
    data[bit // 8] ^= 1 << (bit % 8)
    verdict = chain.BatchVerifier(RING).check(bytes(data))
    assert verdict.status in (chain.BAD_SIGNATURE, chain.MALFORMED, chain.UNKNOWN_KEY), bit


@given(st.binary(max_size=300))
def test_garbage_is_classified_never_raises(data: bytes) -> None:
    assert chain.BatchVerifier(RING).check(data).status == chain.MALFORMED


def model(order: list[int]) -> list[tuple[str, int]]:
    """What the classifier must say for a delivery order of seqs 1..40 (window not exceeded)."""
    seen: set[int] = set()
    top = 0
    out = []
    for s in order:
        if s in seen:
            out.append((chain.DUPLICATE, 0))
        elif s == top + 1:
            out.append((chain.OK, 0))
        elif s > top + 1:
            out.append((chain.GAP, s - top - 1))
        else:
            out.append((chain.REORDERED, 0))
        seen.add(s)
        top = max(top, s)
    return out


deliveries = st.lists(st.integers(1, 40), min_size=1, max_size=60)


@given(deliveries)
@settings(max_examples=200)
def test_chain_classifier_matches_model(order: list[int]) -> None:
    verifier = chain.BatchVerifier(RING)
    got = []
    for s in order:
        v = verifier.check(BATCHES[s - 1])
        got.append((v.status, v.missing))
    assert got == model(order)
    state = verifier.states[DEVICE]
    assert state.missing_count() == max(order) - len(set(order))


@given(st.integers(0, 2**32), st.floats(0, 0.5), st.floats(0, 0.5))
@settings(max_examples=100)
def test_drop_duplicate_reorder_sequences(seed: int, p_drop: float, p_dup: float) -> None:
    rnd = random.Random(seed)
    order = [s for s in range(1, 41) if rnd.random() >= p_drop]
    order += [rnd.choice(order) for _ in range(int(len(order) * p_dup))] if order else []
    for _ in range(len(order) // 4):  # local reordering
        if len(order) > 1:
            i = rnd.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
    if not order:
        return
    verifier = chain.BatchVerifier(RING)
    got = [(verifier.check(BATCHES[s - 1]).status, 0) for s in order]
    assert [g[0] for g in got] == [m[0] for m in model(order)]


record = st.fixed_dictionaries(
    {senml.N: st.sampled_from(["temp", "rh", "pm25", "co2"]),
     senml.V: st.one_of(st.integers(-1000, 10**6), st.floats(-1e6, 1e6))},
    optional={senml.T: st.integers(0, 3600), senml.U: st.sampled_from(["Cel", "%RH", "ppm"]),
              senml.BN: st.just(DEVICE + ":"), senml.BT: st.integers(0, 2**31)})


@given(st.lists(record, max_size=60), st.integers(1, 2**40), st.integers(0, 2**32 - 1),
       st.sampled_from([None, [1, 5, 5, 200]]))
def test_record_buffer_payload_equals_dict_encoding(recs: list[dict[int, Any]], seq: int,
                                                    boot: int, dropped: Any) -> None:
    buf = batchmod.RecordBuffer()
    for r in recs:
        buf.add(r)
    kind = batchmod.KIND_DROP if dropped else batchmod.KIND_READINGS
    streamed = b"".join(batchmod.payload_parts(DEVICE, seq, bytes(32), boot, 0, kind, buf,
                                                   dropped))
    whole = batchmod.Batch(DEVICE, seq, bytes(32), boot, recs, 0, kind, dropped).encode()
    assert streamed == whole


_P256_KEY = p256.PrivateKey(0x1D2C3B4A)
_P256_KID = cose.kid_for_public_key(_P256_KEY.public_key().to_sec1())


class _MessageOnlySigner:
    """A signer without ``sign_digest``: gets the whole Sig_structure (CPython's shape)."""

    def __init__(self, key: p256.PrivateKey) -> None:
        self.key = key
        self.seen: list[bytes] = []

    def sign(self, message: bytes) -> bytes:
        self.seen.append(message)
        return self.key.sign(message)


@settings(max_examples=40)
@given(parts=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
       aad=st.binary(max_size=8))
def test_signing_from_chunks_equals_signing_the_joined_payload(parts: list[bytes],
                                                               aad: bytes) -> None:
    chunks = tuple(bytearray(p) if i % 2 else p for i, p in enumerate(parts))
    joined = b"".join(parts)
    want = cose.encode_sign1(joined, _P256_KEY, _P256_KID, aad)  # RFC 6979: deterministic
    assert cose.encode_sign1_parts(chunks, _P256_KEY, _P256_KID, aad) == want
    other = _MessageOnlySigner(_P256_KEY)
    assert cose.encode_sign1_parts(chunks, other, _P256_KID, aad) == want
    assert other.seen == [cose.sig_structure(cbor.dumps({1: -7, 4: _P256_KID}), joined, aad)]
    msg = cose.decode_sign1(want)
    assert msg.payload == joined
    msg.verify(_P256_KEY.public_key(), aad)


@settings(max_examples=25)
@given(st.lists(record, max_size=20), st.sampled_from([None, [1, 2, 2, 9]]))
def test_batch_signed_in_chunks_equals_the_joined_batch(recs: list[dict[int, Any]],
                                                        dropped: Any) -> None:
    """The device's path (``sign_chunks``: never joined) gives the bytes and the chain head
    ``sign_buffer`` gives, batch after batch."""
    a = batchmod.BatchWriter(DEVICE, _P256_KEY, _P256_KID)
    b = batchmod.BatchWriter(DEVICE, _P256_KEY, _P256_KID)
    kind = batchmod.KIND_DROP if dropped else batchmod.KIND_READINGS
    for _ in range(2):
        buf = batchmod.RecordBuffer()
        for r in recs:
            buf.add(r)
        chunks = a.sign_chunks(buf, 3, 1, kind, dropped)
        assert any(getattr(c, "obj", None) is buf.data for c in chunks)  # not copied
        joined = b.sign_buffer(buf, 3, 1, kind, dropped)
        assert b"".join(chunks) == joined
        assert (a.seq, a.head) == (b.seq, b.head) == (b.seq, batchmod.batch_hash(joined))
