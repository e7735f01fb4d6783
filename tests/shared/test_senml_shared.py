"""SenML fields bounded to what a database stores, on both interpreters: 64-bit integers,
finite floats (also after base-field resolution), text caps per label and no control
characters. Each refusal is checked through the fast pack loop and the per-record rules."""

from cityedge_core import limits, senml
from cityedge_core.errors import LimitError, MalformedError

INT_MAX = limits.SENML_INT_MAX
INT_MIN = -limits.SENML_INT_MAX - 1
NAN = float("nan")
INF = float("inf")
HUGE = 1.7976931348623157e308  # the largest finite double


def _refused(pack):
    """True if both ``validate_pack`` and every ``validate_record`` path refuse ``pack``."""
    fast = slow = False
    try:
        senml.validate_pack(pack)
    except MalformedError:
        fast = True
    try:
        for rec in pack:
            senml.validate_record(rec)
    except MalformedError:
        slow = True
    assert fast == slow, (pack, fast, slow)
    return fast


def _resolve_refused(pack):
    try:
        senml.resolve(pack, 1700000000.0)
    except MalformedError:
        return True
    return False


def test_integers_within_signed_64_bits():
    for label in (senml.V, senml.T, senml.S, senml.BT, senml.BV, senml.BS, senml.UT):
        for ok in (INT_MAX, INT_MIN, 0, -1):
            assert not _refused([{senml.N: "x", senml.V: 1, label: ok}]), (label, ok)
        for bad in (INT_MAX + 1, INT_MIN - 1, 2**70, -(2**200)):
            assert _refused([{senml.N: "x", senml.V: 1, label: bad}]), (label, bad)
    assert _refused([{senml.N: "x", senml.V: 1, senml.BVER: INT_MAX + 1}])
    try:
        senml.validate_record({senml.V: 2**64})
        raise AssertionError("a bignum was accepted")
    except LimitError:
        pass


def test_floats_must_be_finite():
    for label in (senml.V, senml.T, senml.S, senml.BT, senml.BV, senml.BS, senml.UT):
        for bad in (NAN, INF, -INF):
            assert _refused([{senml.N: "x", senml.V: 1.0, label: bad}]), (label, bad)
        for ok in (HUGE, -HUGE, 5e-324, -0.0):
            assert not _refused([{senml.N: "x", senml.V: 1.0, label: ok}]), (label, ok)


def test_unknown_fields_are_bounded_like_known_ones():
    for bad in (NAN, INF, 2**64, "a\x00b", "x" * (limits.SENML_STRING_MAX_CHARS + 1)):
        assert _refused([{senml.N: "x", senml.V: 1, 99: bad}]), bad
        assert _refused([{senml.N: "x", senml.V: 1, "ext": bad}]), bad
    assert _refused([{senml.N: "x", senml.V: 1, "e\x1bxt": 1}])  # a label is text too
    assert _refused([{senml.N: "x", senml.V: 1, 2**64: 1}])
    assert not _refused([{senml.N: "x", senml.V: 1, 99: "fine", "ext": 2.5}])


def test_text_caps_match_the_storage_columns():
    name = limits.DEVICE_ID_MAX_CHARS
    unit = limits.SENML_NAME_MAX_CHARS
    vs = limits.SENML_STRING_MAX_CHARS
    for label, cap in ((senml.BN, name), (senml.N, name), (senml.U, unit), (senml.BU, unit),
                       (senml.VS, vs)):
        rec = {senml.N: "x", senml.VB: True} if label != senml.VS else {senml.N: "x"}
        rec[label] = "a" * cap
        assert not _refused([rec]), (label, cap)
        rec[label] = "a" * (cap + 1)
        assert _refused([rec]), (label, cap)
    # a resolved name is at most DEVICE_ID_MAX_CHARS + SENML_NAME_MAX_CHARS
    assert name + unit == senml.NAME_MAX_CHARS
    longest = [{senml.BN: "b" * name, senml.N: "n" * unit, senml.V: 1}]
    assert len(senml.resolve(longest)[0][senml.N]) == senml.NAME_MAX_CHARS
    assert _resolve_refused([{senml.BN: "b" * name, senml.N: "n" * (unit + 1), senml.V: 1}])


def test_no_control_characters_in_any_text():
    for ch in ("\x00", "\x01", "\n", "\t", "\x1b", "\x1f", "\x7f"):
        for label in (senml.U, senml.BU, senml.VS):
            rec = {senml.N: "x", senml.V: 1} if label != senml.VS else {senml.N: "x"}
            rec[label] = "a" + ch
            assert _refused([rec]), (label, ch)
        assert _refused([{senml.BN: "dev" + ch, senml.N: "x", senml.V: 1}])
    # printable text beyond ASCII is fine, and so is text that is not "printable" to
    # Python but holds no control character (a no-break space, a C1 character)
    for text in ("\u00b5g/m\u00b3", "\u00b0C", "\u00a0", "\u0085", "\U0001f600"):
        assert not _refused([{senml.N: "x", senml.U: text, senml.V: 1}]), text
        assert not _refused([{senml.N: "x", senml.VS: text}]), text
        assert not _refused([{senml.N: "x", senml.VS: text}]), text  # known to the loop now


def test_resolved_values_sums_and_times_must_be_finite():
    assert _resolve_refused([{senml.N: "x", senml.BV: HUGE, senml.V: HUGE}])
    assert _resolve_refused([{senml.N: "x", senml.BV: -HUGE, senml.V: -HUGE}])
    assert _resolve_refused([{senml.N: "x", senml.BS: HUGE, senml.S: HUGE}])
    assert _resolve_refused([{senml.N: "x", senml.BT: HUGE, senml.T: HUGE, senml.V: 1}])
    assert _resolve_refused([{senml.N: "x", senml.BT: -HUGE, senml.T: -HUGE, senml.V: 1}])
    # the base value alone (no v) and large but finite sums are fine
    got = senml.resolve([{senml.N: "x", senml.BV: HUGE}, {senml.N: "y", senml.V: -HUGE}])
    assert got[0][senml.V] == HUGE and got[1][senml.V] == HUGE - HUGE
    got = senml.resolve([{senml.N: "x", senml.BV: INT_MAX, senml.V: INT_MAX}])
    assert got[0][senml.V] == 2 * INT_MAX  # two 64-bit integers: finite, stored as a float
