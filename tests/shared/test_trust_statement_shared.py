"""Trust statements (``cityedge_core.trust_statement``) on CPython (pytest) and MicroPython
(tests/mp/run.py): what the root signs, a device takes; every rule of ``check_statement``
refuses what it names, with the error family its docstring says."""

from cityedge_core import cose, p256, trust_statement
from cityedge_core.errors import LimitError, MalformedError, SignatureError, UnknownKeyError
from cityedge_core.trust_statement import StatementRefused

ROOT = p256.PrivateKey(0x600D5EED01)
ROOT_PUB = ROOT.public_key()
ROOT_KID = cose.kid_for_public_key(ROOT_PUB.to_sec1())
FLEET = p256.PrivateKey(0xF1EE75EED2)  # a fleet command key: never the root
OLD = p256.PrivateKey(0x01D0C0DE03).public_key().to_sec1()
NEW = p256.PrivateKey(0x0EE0C0DE04).public_key().to_sec1()
NOW = 1_800_000_000
_SIGNED = {}


def _statement(version=2, keys=None, nbf=NOW - 60, exp=NOW + 86400, signer=ROOT, kid=None):
    key = (version, nbf, exp, id(signer), kid)
    if keys is None and key in _SIGNED:  # pure-Python signatures are slow on MicroPython
        return _SIGNED[key]
    data = trust_statement.encode_statement(
        signer, kid or ROOT_KID, version,
        keys if keys is not None else [(NEW, None), (OLD, NOW + 3600)], nbf, exp)
    if keys is None:
        _SIGNED[key] = data
    return data


def _refused(data, exc, held=1, now=NOW):
    try:
        trust_statement.check_statement(data, ROOT_PUB, ROOT_KID, held, now)
    except exc as e:
        return e
    raise AssertionError("accepted")


def test_a_device_takes_what_the_root_signs():
    data = _statement()
    assert len(data) <= trust_statement.STATEMENT_MAX_BYTES
    st = trust_statement.check_statement(data, ROOT_PUB, ROOT_KID, 1, NOW)
    assert st.version == 2 and st.purpose == trust_statement.PURPOSE_COMMAND_KEYS
    assert st.keys == [(NEW, None), (OLD, NOW + 3600)]
    assert st.points_at(NOW) == [NEW, OLD]  # the overlap: both
    assert st.points_at(NOW + 3600) == [NEW]  # after it: the new key alone
    assert st.points_at(None) == [NEW]  # no clock: a key with an end is not trusted
    again = trust_statement.read_installed(data, ROOT_PUB, ROOT_KID)
    assert again.keys == st.keys and again.version == 2


def test_a_statement_not_newer_than_the_one_held_is_a_rollback():
    data = _statement(version=2)
    for held in (2, 3):
        e = _refused(data, StatementRefused, held=held)
        assert e.rollback and "rollback" in str(e)


def test_a_statement_outside_its_window_is_refused():
    assert "expired" in str(_refused(_statement(), StatementRefused, now=NOW + 86400))
    assert "not valid before" in str(_refused(_statement(), StatementRefused, now=NOW - 61))
    assert "clock" in str(_refused(_statement(), StatementRefused, now=None))
    assert not _refused(_statement(), StatementRefused, now=NOW + 86400).rollback


def test_a_statement_by_the_fleet_key_is_not_the_roots():
    fleet_kid = cose.kid_for_public_key(FLEET.public_key().to_sec1())
    e = _refused(_statement(signer=FLEET, kid=fleet_kid), UnknownKeyError)
    assert fleet_kid.hex() in str(e)
    # the fleet key naming the root's kid: the signature does not hold
    _refused(_statement(signer=FLEET), SignatureError)


def test_the_root_signature_without_the_aad_does_not_pass():
    payload = cose.decode_sign1(_statement()).payload
    bare = cose.encode_sign1(payload, ROOT, ROOT_KID)  # as any other root signature
    _refused(bare, SignatureError)


def test_truncated_oversized_and_garbage_are_malformed():
    data = _statement()
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        _refused(data[:cut], MalformedError)
    _refused(b"\x00" * 40, MalformedError)
    _refused(b"\xd2" + b"\xff" * 30, MalformedError)
    _refused(b"x" * (trust_statement.STATEMENT_MAX_BYTES + 1), LimitError)
    _refused("text", MalformedError)


def test_the_encoder_refuses_what_the_decoder_would():
    bad = (
        dict(keys=[]),
        dict(keys=[(NEW, NOW)]),  # every key ends
        dict(keys=[(NEW, None), (NEW, None)]),  # twice
        dict(keys=[(NEW[:64], None)]),
        dict(keys=[(b"\x02" + NEW[1:], None)]),
        dict(keys=[(NEW, None)] + [(OLD, NOW)] * 4),
        dict(version=0),
        dict(exp=NOW - 60),  # expires = not_before
        dict(exp=NOW + trust_statement.VALIDITY_MAX_S),
    )
    for kw in bad:
        try:
            _statement(**kw)
        except ValueError:
            continue
        raise AssertionError("encoded %r" % (kw,))


def test_trust_update_args():
    data = _statement()
    assert trust_statement.trust_update_args({1: data}) == data
    for args in (None, [], {}, {1: "text"}, {1: b""}, {2: data}):
        try:
            trust_statement.trust_update_args(args)
        except MalformedError:
            continue
        raise AssertionError("took %r" % (args,))
    try:
        trust_statement.trust_update_args({1: b"x" * (trust_statement.STATEMENT_MAX_BYTES + 1)})
        raise AssertionError("took an oversized statement")
    except LimitError:
        pass
