"""``cose.split_sign1``: the device's slice-only reader of the one COSE_Sign1 form our
encoder writes. It must agree with ``decode_sign1`` on everything it accepts, and refuse
(``MalformedError``/``LimitError``) every other form and every malformed input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import cbor, cose, p256
from cityedge_core.errors import LimitError, MalformedError, PeerError

KEY = p256.PrivateKey(0x5EC12E7)


class _FixedSigner:
    """Any 64 bytes as the signature: the shape is under test here, not the maths."""

    def __init__(self, sig: bytes) -> None:
        self.sig = sig

    def sign(self, message: bytes) -> bytes:
        return self.sig


def outcome(fn: Any, data: bytes) -> Any:
    try:
        return "ok", fn(data)
    except (MalformedError, LimitError) as e:
        return "refused", str(e)


@given(payload=st.binary(max_size=3000), kid=st.binary(min_size=1, max_size=23),
       sig=st.binary(min_size=64, max_size=64))
@settings(max_examples=200)
def test_what_the_encoder_writes_splits_as_it_decodes(payload: bytes, kid: bytes,
                                                      sig: bytes) -> None:
    data = cose.encode_sign1(payload, _FixedSigner(sig), kid)
    got_kid, protected, got_payload, got_sig = cose.split_sign1(data, 1 << 16)
    msg = cose.decode_sign1(data, max_bytes=1 << 16)
    assert (got_kid, protected, got_payload, got_sig) == (
        msg.kid, msg.protected_raw, msg.payload, msg.signature)
    assert cose.sig_structure(protected, got_payload) == msg.to_be_signed()


def test_a_real_signature_verifies_from_the_slices() -> None:
    kid = cose.kid_for_public_key(KEY.public_key().to_sec1())
    data = cose.encode_sign1(b"\xa1\x01\x02", KEY, kid)
    got_kid, protected, payload, sig = cose.split_sign1(data)
    assert got_kid == kid and payload == b"\xa1\x01\x02"
    assert KEY.public_key().verify(cose.sig_structure(protected, payload), sig)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_never_accepts_what_the_full_decoder_refuses(data: bytes) -> None:
    split = outcome(lambda d: cose.split_sign1(d, 4096), data)
    if split[0] == "ok":
        msg = cose.decode_sign1(data, max_bytes=4096)
        assert split[1] == (msg.kid, msg.protected_raw, msg.payload, msg.signature)


@given(st.data())
@settings(max_examples=300)
def test_any_single_byte_change_is_refused_or_changes_what_is_signed(data: Any) -> None:
    good = cose.encode_sign1(b"payload", _FixedSigner(bytes(range(64))), b"k" * 8)
    pos = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[pos] ^= flip
    result = outcome(cose.split_sign1, bytes(bad))
    if result[0] == "ok":  # only a byte inside kid, payload or signature can change
        assert result[1] != cose.split_sign1(good)


def test_other_valid_forms_are_left_to_the_full_decoder() -> None:
    prot = cbor.dumps({1: -7, 4: b"k" * 8})
    sig = bytes(64)
    forms = {
        "untagged": cbor.dumps([prot, {}, b"p", sig]),
        "unprotected kid": cbor.dumps(cbor.Tag(18, [cbor.dumps({1: -7}), {4: b"k"}, b"p",
                                                     sig])),
        "long head": b"\xd2\x84\x58\x0d" + prot + b"\xa0\x41p\x58\x40" + sig,
        "indefinite payload": b"\xd2\x84\x4d" + prot + b"\xa0\x5f\x41p\xff\x58\x40" + sig,
        "content type too": cbor.dumps(cbor.Tag(18, [cbor.dumps({1: -7, 3: 0, 4: b"k"}),
                                                     {}, b"p", sig])),
        "trailing byte": cose.encode_sign1(b"p", _FixedSigner(sig), b"k" * 8) + b"\x00",
        "short signature": b"\xd2\x84\x4d" + prot + b"\xa0\x41p\x58\x3f" + sig[:63],
        "truncated": cose.encode_sign1(b"p", _FixedSigner(sig), b"k" * 8)[:-1],
    }
    for name, data in forms.items():
        with pytest.raises(MalformedError):
            cose.split_sign1(data)
        if name in ("untagged", "truncated", "trailing byte", "short signature"):
            continue
        cose.decode_sign1(data)  # valid COSE all the same: the full decoder reads it
    with pytest.raises(LimitError):
        cose.split_sign1(b"\xd2" * 5000, 4096)
    assert issubclass(LimitError, PeerError)
