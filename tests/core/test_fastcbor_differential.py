"""Differential tests of the CPython fast path against the core, token by token.

``fastcbor.loads`` / ``loads_batch_payload`` / ``decode_sign1`` must give what the core
gives (``cbor.loads``, ``Batch.from_map`` over it, ``cose.decode_sign1``): the same value or
a ``MalformedError``. Inputs are built from CBOR tokens (heads of every width, indefinite
lengths, breaks, simple values, semantic tags cbor2 interprets, bignums ...) so that they
reach the corners random bytes rarely reach. The differences ``fastcbor`` documents
(duplicate map keys, tags 25/28/29/256/55799 unwrapped, bignums over 64 bytes) are told
apart by what the core made of the input, and pinned by their own test.
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import batch as batchmod
from cityedge_core import cbor, cose, cose_decode, limits
from cityedge_core.errors import PeerError
from cityedge_host import fastcbor
from cityedge_host.crypto import EcSigner

from helpers import DEVICE, records
from support.cbor_compare import (
    UNWRAPPED,
    assert_agree,
    documented_difference,
    has_duplicate_key,
    norm,
    outcome,
    same_decoded,
)

# --- CBOR built from tokens ----------------------------------------------------------------

def head(major: int, n: int, width: int) -> bytes:
    """A head with argument ``n`` in a chosen width (0: in the initial byte if it fits)."""
    if width == 0 and n < 24:
        return bytes([major << 5 | n])
    if width <= 1 and n < 256:
        return bytes([major << 5 | 24, n])
    if width <= 2 and n < 65536:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if width <= 3 and n < 2**32:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


widths = st.sampled_from([0, 0, 0, 1, 2, 3, 4])
small = st.one_of(st.integers(0, 30), st.integers(0, 2**64 - 1))
tags = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 18, 24, 30, 32, 35, 36, 37, 100, 258, 260,
                                  261, 1004, 43000, 2**16 + 1]),
                 st.integers(0, 2**32))
utf8 = st.text(max_size=6).map(lambda s: s.encode())


@st.composite
def item(draw: Any, depth: int = 0) -> bytes:
    kinds = ["uint", "nint", "bytes", "text", "simple", "float", "raw"]
    if depth < 4:
        kinds += ["array", "map", "tag", "indef_array", "indef_map", "indef_string"]
    kind = draw(st.sampled_from(kinds))
    if kind == "uint":
        return head(0, draw(small), draw(widths))
    if kind == "nint":
        return head(1, draw(small), draw(widths))
    if kind == "bytes":
        b = draw(st.binary(max_size=6))
        return head(2, len(b), draw(widths)) + b
    if kind == "text":
        t = draw(st.one_of(utf8, st.binary(max_size=4)))  # also invalid UTF-8
        return head(3, len(t), draw(widths)) + t
    if kind == "simple":
        return draw(st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xe0", b"\xf3",
                                     b"\xf8\x00", b"\xf8\x13", b"\xf8\x20", b"\xf8\xff",
                                     b"\xff", b"\xfc", b"\xfe"]))
    if kind == "float":
        x = draw(st.floats(allow_nan=True, allow_infinity=True))
        width = draw(st.sampled_from(["e", "f", "d"]))
        try:
            return {"e": b"\xf9", "f": b"\xfa", "d": b"\xfb"}[width] + struct.pack(">" + width, x)
        except (OverflowError, struct.error):
            return b"\xfb" + struct.pack(">d", x)
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=3))
    if kind == "array":
        items = draw(st.lists(item(depth + 1), max_size=4))
        return head(4, len(items) + draw(st.sampled_from([0, 0, 0, 1])), draw(widths)) + \
            b"".join(items)
    if kind == "map":
        pairs = draw(st.lists(st.tuples(item(depth + 1), item(depth + 1)), max_size=3))
        return head(5, len(pairs), draw(widths)) + b"".join(k + v for k, v in pairs)
    if kind == "tag":
        return head(6, draw(tags), draw(widths)) + draw(item(depth + 1))
    if kind == "indef_array":
        return b"\x9f" + b"".join(draw(st.lists(item(depth + 1), max_size=3))) + \
            draw(st.sampled_from([b"\xff", b"\xff", b""]))
    if kind == "indef_map":
        pairs = draw(st.lists(st.tuples(item(depth + 1), item(depth + 1)), max_size=2))
        return b"\xbf" + b"".join(k + v for k, v in pairs) + b"\xff"
    major = draw(st.sampled_from([2, 3]))  # indef_string: chunks, sometimes of the wrong kind
    chunks = draw(st.lists(st.tuples(st.sampled_from([major, major, 2, 3]),
                                     st.binary(max_size=3)), max_size=3))
    return bytes([major << 5 | 31]) + b"".join(head(m, len(c), 0) + c for m, c in chunks) + \
        b"\xff"


inputs = st.one_of(item(), st.tuples(item(), st.binary(max_size=2)).map(lambda t: t[0] + t[1]))


@given(inputs)
@settings(max_examples=1500)
def test_loads_agrees_with_core_on_token_built_input(data: bytes) -> None:
    assert_agree(cbor.loads, fastcbor.loads, data)


@given(st.binary(max_size=60))
@settings(max_examples=600)
def test_loads_agrees_with_core_on_random_bytes(data: bytes) -> None:
    assert_agree(cbor.loads, fastcbor.loads, data)


# --- depth and item-count limits --------------------------------------------------------------

@given(st.integers(10, 22), st.sampled_from([b"\x00", b"\x80", b"\xc2\x41\x01", b"\xe0",
                                             b"\xd9\xff\xff\x00", b"\xa1\x00\x00"]),
       st.sampled_from([b"\x81", b"\xa1\x01", b"\xd9\xff\xff", b"\x9f"]))
def test_depth_limit_agrees(levels: int, leaf: bytes, wrap: bytes) -> None:
    """Nested arrays, maps, tags and indefinite arrays around scalars, bignums, containers."""
    data = wrap * levels + leaf + (b"\xff" * levels if wrap == b"\x9f" else b"")
    assert_agree(cbor.loads, fastcbor.loads, data)


@given(st.integers(4090, 4100), st.sampled_from(["uint", "bignum", "nested", "indef"]))
@settings(max_examples=60)
def test_item_count_limit_agrees(n: int, kind: str) -> None:
    """Over 4096 bytes the fast path counts with an upper bound; the core decides near it."""
    if kind == "uint":
        body = head(4, n, 0) + b"\x00" * n
    elif kind == "bignum":  # each c2 40 is one int for cbor2 and two items for the core
        body = head(4, n // 2, 0) + b"\xc2\x40" * (n // 2)
    elif kind == "nested":
        body = head(4, n // 2, 0) + b"\x81\x00" * (n // 2)
    else:
        body = b"\x9f" + b"\x00" * n + b"\xff"
    for data in (body, cbor.dumps({1: 0, 99: cbor.loads(body, max_items=10**6)})):
        assert_agree(cbor.loads, fastcbor.loads, data)


# --- batch payloads: Batch.from_map over each decoder ----------------------------------------

def to_batch(decode: Any) -> Any:
    def run(data: bytes) -> Any:
        return batchmod.Batch.from_map(decode(data)).to_map()
    return run


senml_labels = st.sampled_from([-1, -2, -3, -4, -5, -16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 99, "x",
                                "y_"])
senml_values = st.one_of(st.integers(-3, 2**40), st.floats(), st.text(max_size=4),
                         st.binary(max_size=3), st.booleans(), st.none(),
                         st.builds(cbor.Simple, st.sampled_from([0, 19, 32])),
                         st.builds(cbor.Tag, st.sampled_from([1, 2**20]), st.integers(0, 5)),
                         st.lists(st.integers(0, 3), max_size=2))
plain_record = st.fixed_dictionaries(
    {0: st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=5)},
    optional={2: st.one_of(st.floats(allow_nan=False), st.integers(-2**70, 2**70)),
              6: st.integers(0, 2**40), 1: st.sampled_from(["Cel", "%RH", "x" * 129]),
              3: st.text(max_size=3), 4: st.booleans(), 8: st.binary(max_size=3),
              -1: st.integers(-1, 2)})
record = st.one_of(plain_record, plain_record, st.dictionaries(senml_labels, senml_values,
                                                               max_size=4))
field_values = st.one_of(st.integers(-1, 2**48), st.text(max_size=4), st.binary(max_size=3),
                         st.none(), st.booleans(), st.lists(st.integers(0, 9), max_size=4),
                         st.builds(cbor.Tag, st.sampled_from([0, 1, 2**20]), st.text(max_size=3)),
                         st.builds(cbor.Simple, st.sampled_from([0, 5, 32, 255])))


@st.composite
def payload_maps(draw: Any) -> dict[Any, Any]:
    m: dict[Any, Any] = {1: 0, 2: DEVICE, 3: draw(st.integers(1, 9)), 4: bytes(32), 5: 1, 6: 0,
                         7: draw(st.lists(record, max_size=4)) + records(2)}
    for key in draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 64]), max_size=2)):
        m[key] = draw(field_values)
    return m


@given(payload_maps())
@settings(max_examples=800)
def test_batch_payloads_agree(m: dict[Any, Any]) -> None:
    data = cbor.dumps(m)
    assert_agree(to_batch(cbor.loads), to_batch(fastcbor.loads_batch_payload), data)


@given(payload_maps(), st.integers(0, 10**6), item(), st.booleans())
@settings(max_examples=800)
def test_spliced_batch_payloads_agree(m: dict[Any, Any], where: int, token: bytes,
                                      replace: bool) -> None:
    """A token spliced into (or over) a valid payload at any byte position."""
    data = cbor.dumps(m)
    i = where % (len(data) + 1)
    data = data[:i] + token + data[i + (len(token) if replace else 0):]
    assert_agree(to_batch(cbor.loads), to_batch(fastcbor.loads_batch_payload), data)


def test_large_batch_payloads_agree() -> None:
    """Past 4096 bytes the payload's item count is bounded without a walk of the records;
    near the limit the core decides."""
    big = [{0: "temp", 6: i, 2: 20 + i / 7} for i in range(limits.BATCH_MAX_RECORDS)]
    verdicts = []
    for extra in ([], list(range(700)), [[0]] * 1100, list(range(2400))):
        m = {1: 0, 2: DEVICE, 3: 1, 4: bytes(32), 5: 1, 6: 0, 7: big, 99: extra}
        data = cbor.dumps(m)
        assert limits.CBOR_MAX_ITEMS < len(data) <= limits.BATCH_MAX_BYTES
        core = outcome(to_batch(cbor.loads), data)
        fast = outcome(to_batch(fastcbor.loads_batch_payload), data)
        assert core[0] == fast[0]
        if core[0] == "ok":
            assert same_decoded(core[1], norm(fast[1]))
        verdicts.append(core[0])
    assert verdicts == ["ok", "ok", "ok", "malformed"]  # the last: 4209 items
    # 256 records alone stay under the bound: no second decode by the core
    assert fastcbor._payload_bound(cbor2.loads(cbor.dumps({7: big}))) <= limits.CBOR_MAX_ITEMS


# --- the envelope --------------------------------------------------------------------------

SIGNER = EcSigner.generate()


def sign1_fields(msg: Any) -> Any:
    return (msg.protected_raw, msg.protected, msg.unprotected, msg.payload, msg.signature,
            msg.to_be_signed(), msg.to_be_signed(b"aad"), msg.kid)


def envelope_outcome(decode: Any, data: Any) -> Any:
    try:
        return "ok", sign1_fields(decode(data))
    except PeerError as e:
        return type(e).__name__, None


@st.composite
def envelopes(draw: Any) -> bytes:
    """Mostly what a device sends, with at most one or two things changed."""
    prot_map = draw(st.one_of(
        st.just({1: -7, 4: SIGNER.kid}),
        st.fixed_dictionaries({1: st.just(-7)},
                              optional={4: st.binary(max_size=70), 3: st.integers(0, 60),
                                        2: st.lists(st.sampled_from([1, 3, 4, 99]),
                                                    max_size=2)}),
        st.dictionaries(st.sampled_from([1, 2, 3, 4, 99]),
                        st.one_of(st.just(-7), st.integers(-8, 3), st.binary(max_size=70),
                                  st.lists(st.sampled_from([1, 2, 3, 4, 99]), max_size=2),
                                  st.text(max_size=3)), max_size=4)))
    payload = draw(st.sampled_from([0, 1, 23, 24, 255, 256, 300, 900])) * b"\x07"
    prot = cbor.dumps(prot_map)
    sig = b"\x11" * 64
    unprot = b"\xa0"
    w = (0, 0, 0)
    start = b"\xd2\x84"
    end = b""
    cut = None
    for change in draw(st.lists(st.sampled_from(["prot", "unprot", "width", "sig", "start",
                                                  "end", "cut"]), max_size=2)):
        if change == "prot":
            prot = draw(st.sampled_from([b"", b"\xa0", b"\x80", b"\xa1\x01\x26\x00"]))
        elif change == "unprot":
            unprot = draw(st.sampled_from([b"\xa1\x04\x41\x00", b"\xa1\x01\x26", b"\xbf\xff",
                                           b"\xa1\x63\x6b\x69\x64\x00", b"\x80", b"\x40"]))
        elif change == "width":
            w = draw(st.tuples(widths, widths, widths))
        elif change == "sig":
            sig = draw(st.sampled_from([b"\x11" * 63, b"\x11" * 65, b""]))
        elif change == "start":
            start = draw(st.sampled_from([b"\x84", b"\xd1\x84", b"\xd2\x83", b"\xd2\x85",
                                          b"\xd8\x12\x84", b"\xd2\x9f", b"\xd2\xd2\x84"]))
        elif change == "end":
            end = draw(st.sampled_from([b"\xff", b"\x00", b"\x58\x40"]))
        else:
            cut = draw(st.integers(0, 2000))
    body = head(2, len(prot), w[0]) + prot + unprot + head(2, len(payload), w[1]) + payload + \
        head(2, len(sig), w[2]) + sig
    data = start + body + end
    return data if cut is None else data[:cut]


@given(envelopes())
@settings(max_examples=1500)
def test_envelope_layout_reader_agrees_with_core(data: bytes) -> None:
    assert envelope_outcome(fastcbor.decode_sign1, data) == \
        envelope_outcome(cose.decode_sign1, data)


@given(st.binary(max_size=120))
@settings(max_examples=400)
def test_envelope_agrees_on_random_bytes(data: bytes) -> None:
    assert envelope_outcome(fastcbor.decode_sign1, data) == \
        envelope_outcome(cose.decode_sign1, data)


def test_envelope_layout_reader_takes_real_batches_and_slices_the_sig_structure() -> None:
    w = batchmod.BatchWriter(DEVICE, SIGNER, SIGNER.kid)
    for n in (1, 2, 50, 200):
        data = w.sign(records(n), boot=1)
        fast = fastcbor._sign1_layout(data)
        assert fast is not None  # the byte-layout path, not the fallback
        core = cose.decode_sign1(data)
        assert sign1_fields(fast) == sign1_fields(core)
        assert fast.to_be_signed() == cose.sig_structure(core.protected_raw, core.payload)
        assert fast.verify(SIGNER.verifier()) is None
    # the same batch with non-preferred heads: not the layout path, the same Sign1
    core = cose.decode_sign1(data)
    prot, payload, sig = core.protected_raw, core.payload, core.signature
    assert cbor.dumps(cbor.Tag(18, [prot, {}, payload, sig])) == data
    for w in ((1, 0, 0), (0, 3, 0), (0, 0, 2)):
        odd = b"".join((b"\xd2\x84", head(2, len(prot), w[0]), prot, b"\xa0",
                        head(2, len(payload), w[1]), payload, head(2, 64, w[2]), sig))
        assert odd != data and fastcbor._sign1_layout(odd) is None
        assert sign1_fields(fastcbor.decode_sign1(odd)) == sign1_fields(core)


def test_sign1_given_tbs_uses_it_only_without_external_aad() -> None:
    msg = cose_decode.Sign1(b"\xa1\x01\x26", {1: -7}, {}, b"p", b"s" * 64, tbs=b"given")
    assert msg.to_be_signed() == b"given"
    assert msg.to_be_signed(b"x") == cose.sig_structure(b"\xa1\x01\x26", b"p", b"x")


# --- the documented differences --------------------------------------------------------------

def test_documented_differences_are_exactly_these() -> None:
    """Each needs bytes a device key signed; cityedge's encoder writes none of them."""
    dup = bytes.fromhex("a2030103 02".replace(" ", ""))
    assert outcome(cbor.loads, dup)[0] == "malformed"
    assert fastcbor.loads(dup) == {3: 2}
    for tag in sorted(UNWRAPPED - {25, 29}):  # 25 and 29 refer to earlier items
        data = head(6, tag, 0) + b"\x05"
        assert cbor.loads(data) == cbor.Tag(tag, 5)
        assert fastcbor.loads(data) == 5
    big = b"\xc2\x58\x41" + b"\x01" * 65
    assert outcome(cbor.loads, big)[0] == "malformed"
    assert fastcbor.loads(big) == int.from_bytes(b"\x01" * 65, "big")
    for data in (dup, head(6, 28, 0) + b"\x05", big):
        assert documented_difference(outcome(cbor.loads, data), data)
    # a duplicate key whose first value held the core's first error: the error is gone
    hidden = bytes.fromhex("bf40bfbfff00ff4000ff")  # {h'': {{}: 0}, h'': 0}
    assert "map key is an array or map" in outcome(cbor.loads, hidden)[1]
    assert fastcbor.loads(hidden) == {b"": 0}
    assert documented_difference(outcome(cbor.loads, hidden), hidden)
    assert not has_duplicate_key(bytes.fromhex("bf40bfbfff00ff4100ff"))  # h'' and h'00'

