"""Property tests of the command and result formats (``cityedge_core.command``,
``command_decode``): every result the encoder makes decodes to what it was given; the
decoder takes exactly the payloads its rules allow (an independent oracle decides); any
bytes, and any change to a signed result, are refused with a ``PeerError``, never taken
as another result and never another exception."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import cbor, command, command_decode, cose, limits
from cityedge_core.errors import MalformedError, PeerError, SignatureError
from cityedge_host.crypto import EcSigner

from support.cbor_compare import same, values

KEY = EcSigner.generate()
OTHER = EcSigner.generate()
VERIFIER = KEY.verifier()

names = st.from_regex(r"[a-z][a-z0-9._-]{0,31}", fullmatch=True)
devices = st.from_regex(r"urn:dev:(mac|ow|org):[0-9a-zA-Z._:-]{2,100}", fullmatch=True)
seqs = st.integers(0, limits.SEQ_MAX)
outcomes = st.sampled_from(command.OUTCOMES)
details = st.text(max_size=limits.RESULT_DETAIL_MAX_CHARS + 40)
small_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.integers(0, 100), st.text(max_size=5)),
                                            inner, max_size=4)),
    max_leaves=12)


@given(names, devices, seqs, outcomes, details, st.one_of(st.none(), small_values))
@settings(max_examples=200, deadline=None)
def test_every_result_round_trips(name: str, device: str, seq: int, outcome: str,
                                  detail: str, data: Any) -> None:
    signed = command.encode_result(KEY, KEY.kid, name, device, seq, outcome, detail, data)
    r = command_decode.decode_result(signed, VERIFIER)
    assert (r.name, r.device, r.seq, r.outcome) == (name, device, seq, outcome)
    assert r.detail == detail[:limits.RESULT_DETAIL_MAX_CHARS]
    assert same(r.data, data) and r.extra == {}
    assert len(signed) <= limits.RESULT_MAX_BYTES


def _oracle(body: Any) -> bool:
    """The rules of ``command_decode`` written again, independently."""
    import re

    if not isinstance(body, dict):
        return False
    if any(not (type(k) is int and k >= 0) for k in body):
        return False
    name, device, seq = body.get(1), body.get(2), body.get(3)
    if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9._-]{0,31}", name)):
        return False
    if not (isinstance(device, str) and len(device) <= 128 and re.fullmatch(
            r"urn:dev:[A-Za-z0-9._:-]{2,}", device)):
        return False
    if not (type(seq) is int and 0 <= seq <= limits.SEQ_MAX):
        return False
    if body.get(4) not in ("ok", "refused", "failed"):
        return False
    detail = body.get(5, "")
    if not (isinstance(detail, str) and len(detail) <= limits.RESULT_DETAIL_MAX_CHARS):
        return False
    return 6 not in body or len(cbor.dumps(body[6])) <= limits.RESULT_DATA_MAX_BYTES


field_values = st.one_of(names, devices, seqs, outcomes, st.text(max_size=8),
                         st.integers(-5, 2**49), st.booleans(), st.none(),
                         st.binary(max_size=4), st.sampled_from(["Status", "a b", ""]),
                         st.text(min_size=limits.RESULT_DETAIL_MAX_CHARS - 1,
                                 max_size=limits.RESULT_DETAIL_MAX_CHARS + 1))


@st.composite
def payloads(draw: st.DrawFn) -> Any:
    """Result maps that are right, or wrong in one or more ways."""
    body: dict[Any, Any] = {1: draw(names), 2: draw(devices), 3: draw(seqs),
                            4: draw(outcomes), 5: draw(st.text(max_size=10))}
    for key in draw(st.lists(st.integers(1, 8), max_size=3)):
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(field_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(["1", -1, b"k", 1.5]))] = 1
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=3)))
    return body


@given(payloads())
@settings(max_examples=400, deadline=None)
def test_the_decoder_takes_exactly_what_the_rules_allow(body: Any) -> None:
    signed = cose.encode_sign1(cbor.dumps(body), KEY, KEY.kid)
    try:
        r = command_decode.decode_result(signed, VERIFIER)
    except MalformedError:
        assert not _oracle(body), body
        return
    assert _oracle(body), body
    assert (r.name, r.device, r.seq, r.outcome) == (body[1], body[2], body[3], body[4])
    assert set(r.extra) == set(body) - {1, 2, 3, 4, 5, 6}


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_any_bytes_are_refused_with_a_peer_error(data: bytes) -> None:
    with contextlib.suppress(PeerError):
        command_decode.decode_result(data, VERIFIER)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_any_change_to_a_signed_result_is_refused(data: st.DataObject) -> None:
    signed = command.encode_result(KEY, KEY.kid, "rotate", "urn:dev:mac:0024befffe804ff1",
                                   data.draw(seqs), data.draw(outcomes), "x")
    pos = data.draw(st.integers(0, len(signed) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(signed)
    changed[pos] ^= flip
    try:
        command_decode.decode_result(bytes(changed), VERIFIER)
    except PeerError:
        return
    raise AssertionError("a changed result was taken (byte %d ^ %d)" % (pos, flip))


@given(values)
@settings(max_examples=100, deadline=None)
def test_a_result_signed_by_another_key_is_a_signature_error(data: Any) -> None:
    with contextlib.suppress(ValueError):  # data over the limit: nothing signed
        signed = command.encode_result(OTHER, KEY.kid, "status",
                                       "urn:dev:mac:0024befffe804ff1", 1, "ok", "", data)
        try:
            command_decode.decode_result(signed, VERIFIER)
        except SignatureError:
            return
        raise AssertionError("taken")


@given(names, devices, seqs, st.integers(0, 2**40), st.one_of(st.none(), small_values))
@settings(max_examples=100, deadline=None)
def test_a_command_carries_its_fields_in_the_form_a_device_reads(
        name: str, target: str, seq: int, expires: int, args: Any) -> None:
    signed = command.encode_command(KEY, KEY.kid, name, target, seq, expires, args)
    kid, protected, payload, sig = cose.split_sign1(signed, limits.COMMAND_MAX_BYTES)
    assert kid == KEY.kid and VERIFIER.verify(cose.sig_structure(protected, payload), sig)
    body = cbor.loads(payload)
    assert body[command.C_NAME] == name and body[command.C_TARGET] == target
    assert body[command.C_SEQ] == seq and body[command.C_EXPIRES] == expires
    assert same(body.get(command.C_ARGS), args)
