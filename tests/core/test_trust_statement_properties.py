"""Property tests of trust statements (``cityedge_core.trust_statement``): every statement
the root can sign is taken back as it was signed; the payload decoder takes exactly what
its rules allow (an independent oracle decides); any change to a signed statement (a bit
flipped, a byte cut, a byte added) is refused with a ``PeerError``, never taken as another
statement and never another exception."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import cbor, cose, trust_statement
from cityedge_core.errors import MalformedError, PeerError
from cityedge_core.trust_statement import TIME_MAX, VALIDITY_MAX_S, VERSION_MAX
from cityedge_host.crypto import EcSigner, public_sec1

ROOT = EcSigner.generate()
ROOT_PUB = ROOT.verifier()
POINTS = [public_sec1(EcSigner.generate().public_key) for _ in range(6)]
NOW = 1_800_000_000

untils = st.one_of(st.none(), st.integers(0, TIME_MAX))
key_sets = st.lists(st.tuples(st.sampled_from(POINTS), untils), min_size=1,
                    max_size=trust_statement.KEYS_MAX, unique_by=lambda k: k[0]).filter(
    lambda ks: any(u is None for _, u in ks))
versions = st.integers(1, VERSION_MAX)


@st.composite
def windows(draw: Any) -> tuple[int, int]:
    nbf = draw(st.integers(NOW - VALIDITY_MAX_S + 1, NOW))
    exp = draw(st.integers(NOW + 1, nbf + VALIDITY_MAX_S))
    return nbf, exp


def _sign(version: int, keys: Any, nbf: int, exp: int) -> bytes:
    return trust_statement.encode_statement(ROOT, ROOT.kid, version, keys, nbf, exp)


@given(versions, key_sets, windows(), st.integers(0, VERSION_MAX))
@settings(max_examples=150, deadline=None)
def test_every_statement_round_trips(version: int, keys: Any, window: tuple[int, int],
                                     held: int) -> None:
    data = _sign(version, keys, *window)
    assert len(data) <= trust_statement.STATEMENT_MAX_BYTES
    if held >= version:
        try:
            trust_statement.check_statement(data, ROOT_PUB, ROOT.kid, held, NOW)
        except trust_statement.StatementRefused as e:
            assert e.rollback
            return
        raise AssertionError("a rollback was taken")
    st_ = trust_statement.check_statement(data, ROOT_PUB, ROOT.kid, held, NOW)
    assert (st_.version, st_.keys, (st_.not_before, st_.expires)) == (version, keys, window)
    assert st_.points_at(NOW) == [p for p, u in keys if u is None or u > NOW]


def _oracle(body: Any) -> bool:
    """The payload rules written again, independently."""
    if not isinstance(body, dict) or set(body) != {1, 2, 3, 4, 5}:
        return False
    if any(type(k) is not int for k in body):
        return False
    if body[1] != "cityedge fleet command keys":
        return False

    def uint(v: Any, top: int) -> bool:
        return type(v) is int and 0 <= v <= top

    if not uint(body[2], VERSION_MAX) or body[2] < 1:
        return False
    keys = body[3]
    if type(keys) is not list or not 1 <= len(keys) <= 4:
        return False
    points = []
    for e in keys:
        if type(e) is not dict or 1 not in e or not set(e) <= {1, 2}:
            return False
        if any(type(k) is not int for k in e):
            return False
        p = e[1]
        if type(p) is not bytes or len(p) != 65 or p[0] != 4 or p in points:
            return False
        points.append(p)
        if 2 in e and not uint(e[2], TIME_MAX):
            return False
    if all(2 in e for e in keys):
        return False
    nbf, exp = body[4], body[5]
    return uint(nbf, TIME_MAX) and uint(exp, TIME_MAX) and 0 < exp - nbf <= VALIDITY_MAX_S


leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**41), st.binary(max_size=70),
                 st.sampled_from(POINTS), st.just("cityedge fleet command keys"),
                 st.text(max_size=5))
entry = st.one_of(st.dictionaries(st.sampled_from([1, 2, 3, True]), leaf, max_size=3),
                  st.fixed_dictionaries({1: st.sampled_from(POINTS)},
                                        optional={2: st.one_of(leaf, st.integers(0, 2**40))}),
                  leaf)
bodies = st.one_of(
    st.fixed_dictionaries(
        {1: st.one_of(st.just("cityedge fleet command keys"), leaf),
         2: st.one_of(st.integers(0, 2**49), leaf),
         3: st.lists(entry, max_size=5),
         4: st.one_of(st.integers(0, 2**41), leaf),
         5: st.one_of(st.integers(0, 2**41), leaf)},
        optional={6: leaf, 0: leaf}),
    st.dictionaries(st.integers(0, 6), leaf, max_size=6), leaf, st.lists(leaf, max_size=3))


@given(bodies)
@settings(max_examples=400, deadline=None)
def test_the_payload_decoder_takes_exactly_what_the_rules_allow(body: Any) -> None:
    payload = cbor.dumps(body)
    try:
        trust_statement.statement_from_payload(payload)
        taken = True
    except MalformedError:
        taken = False
    assert taken == _oracle(body), body


SIGNED = _sign(7, [(POINTS[0], None), (POINTS[1], NOW + 600)], NOW - 10, NOW + 3600)


def _refused(data: bytes) -> None:
    try:
        trust_statement.check_statement(data, ROOT_PUB, ROOT.kid, 0, NOW)
    except PeerError:
        return
    raise AssertionError("a changed statement was taken")


@given(st.integers(0, len(SIGNED) * 8 - 1))
@settings(max_examples=400, deadline=None)
def test_any_bit_flipped_is_refused(bit: int) -> None:
    data = bytearray(SIGNED)
    data[bit // 8] ^= 1 << (bit % 8)
    _refused(bytes(data))


@given(st.integers(0, len(SIGNED) - 1), st.binary(min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_any_cut_or_insertion_is_refused(pos: int, extra: bytes) -> None:
    _refused(SIGNED[:pos])
    _refused(SIGNED[:pos] + extra + SIGNED[pos:])


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_refused_with_a_peer_error(data: bytes) -> None:
    _refused(data)


def test_the_original_is_taken() -> None:  # so the refusals above are the change's doing
    st_ = trust_statement.check_statement(SIGNED, ROOT_PUB, ROOT.kid, 0, NOW)
    assert st_.version == 7 and cose.decode_sign1(SIGNED).kid == ROOT.kid
