"""CBOR codec tests that run on CPython (pytest) and MicroPython (tests/mp/run.py)."""

from cityedge_core import cbor
from cityedge_core.errors import LimitError, MalformedError

from .vectors import load_json, unhex


def _raises(exc, fn, *args):
    try:
        fn(*args)
    except exc:
        return True
    raise AssertionError("expected %s" % exc.__name__)


def _same(a, b):
    # NaN-aware structural equality
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def test_appendix_a_decodes_and_roundtrips():
    passed = 0
    for case in load_json("cbor-test-vectors/appendix_a.json"):
        data = unhex(case["hex"])
        if case["hex"] == "f818":  # simple(24): not well-formed under RFC 8949 §3.3
            _raises(MalformedError, cbor.loads, data)
            passed += 1
            continue
        value = cbor.loads(data)
        if "decoded" in case:
            assert _same(value, case["decoded"]), (case["hex"], value)
        if case["roundtrip"]:
            assert cbor.dumps(value) == data, (case["hex"], cbor.dumps(value))
        passed += 1
    assert passed == 82


def test_every_pull5_failure_is_rejected():
    cases = load_json("cbor-test-vectors/pull-5/fail.json")
    for case in cases:
        _raises(MalformedError, cbor.loads, unhex(case["hex"]))
    assert len(cases) == 679


def test_deterministic_map_order_and_shortest_heads():
    assert cbor.dumps({"b": 1, "a": 2, 10: 3, -1: 4}) == unhex("a40a032004616102616201")
    assert cbor.dumps(23) == b"\x17"
    assert cbor.dumps(24) == b"\x18\x18"
    assert cbor.dumps(1.5) == unhex("f93e00")
    assert cbor.dumps(100000.0) == unhex("fa47c35000")
    assert cbor.dumps(1.1) == unhex("fb3ff199999999999a")


def test_limits():
    _raises(LimitError, cbor.loads, b"\x81" * 40)
    _raises(LimitError, cbor.loads, b"\x5a\x00\x01\x00\x00" + bytes(65536 - 5))
    _raises(MalformedError, cbor.loads, b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff")
    _raises(MalformedError, cbor.loads, b"\xa2\x01\x02\x01\x03")  # duplicate key
    _raises(MalformedError, cbor.loads, b"\x62\xc3\x28")  # invalid UTF-8
    _raises(MalformedError, cbor.loads, b"\x01\x02")  # trailing byte
    assert cbor.decode_prefix(b"\x01\x02") == (1, 1)
