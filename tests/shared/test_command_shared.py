"""Fleet commands and results (``cityedge_core.command``), on CPython (pytest) and
MicroPython (tests/mp/run.py): the device's gate reads exactly what the core encodes (its
private copies of the keys and its size limit are the core's), and a result survives the
round trip and is refused when it is not what the format says."""

from cityedge_core import cbor, command, command_decode, cose, limits, p256
from cityedge_core import command_gate as commands
from cityedge_core.errors import LimitError, MalformedError, SignatureError

DEVICE = "urn:dev:mac:0024befffe804ff1"
NOW = 1800000000
FLEET = p256.PrivateKey(0x5EC0DE1234567)
FLEET_KID = cose.kid_for_public_key(FLEET.public_key().to_sec1())
DEV_KEY = p256.PrivateKey(0xD1CE5EED42)
DEV_KID = cose.kid_for_public_key(DEV_KEY.public_key().to_sec1())


class _State:
    def __init__(self):
        self.values = {}

    def get(self, key, default=None):
        return self.values.get(key, default)

    def set(self, **kv):
        for k in kv:
            self.values[k] = kv[k]


def _gate():
    return commands.CommandGate(DEVICE, {FLEET_KID: FLEET.public_key()}, _State(),
                                lambda: NOW)


def _refused(gate, data):
    try:
        gate.check(data)
    except commands.CommandRefused as e:
        return str(e)
    raise AssertionError("accepted")


def test_the_device_gate_reads_every_field_the_core_encodes():
    """Each key means the same to both: name, seq and args come back; the target (2), the
    expiry (4) and the sequence (3) are each the one the gate checks."""
    gate = _gate()
    args = {"sample_interval_s": 30, "tags": ["a", "b"]}
    cmd = command.encode_command(FLEET, FLEET_KID, "desired", DEVICE, 7, NOW + 60, args)
    assert gate.check(cmd) == ("desired", 7, args)
    other = command.encode_command(FLEET, FLEET_KID, "status", DEVICE + "0", 8, NOW + 60)
    assert "not this device" in _refused(gate, other)
    old = command.encode_command(FLEET, FLEET_KID, "status", DEVICE, 9, NOW)
    assert "expired" in _refused(gate, old)
    assert "replay" in _refused(gate, cmd)
    assert gate.state.get("cmd_seq") == 7


def test_the_gates_copies_of_the_keys_and_limit_are_the_cores():
    assert commands.MAX_COMMAND_BYTES == limits.COMMAND_MAX_BYTES
    # private consts are folded away by MicroPython's compiler: compared where they exist
    for private, public in (("_C_NAME", command.C_NAME), ("_C_TARGET", command.C_TARGET),
                            ("_C_SEQ", command.C_SEQ), ("_C_EXPIRES", command.C_EXPIRES),
                            ("_C_ARGS", command.C_ARGS)):
        value = getattr(commands, private, None)
        assert value is None or value == public, private


def test_a_command_over_the_limit_is_refused_by_the_gate():
    gate = _gate()
    pad = "x" * (limits.COMMAND_MAX_BYTES - 180)
    cmd = command.encode_command(FLEET, FLEET_KID, "status", DEVICE, 1, NOW + 60, pad)
    n = len(cmd)
    assert n <= limits.COMMAND_MAX_BYTES
    grown = command.encode_command(FLEET, FLEET_KID, "status", DEVICE, 1, NOW + 60,
                                   pad + "x" * (limits.COMMAND_MAX_BYTES + 1 - n))
    assert len(grown) == limits.COMMAND_MAX_BYTES + 1
    try:
        gate.check(grown)
    except LimitError:
        pass
    else:
        raise AssertionError("a command over the limit was read")
    assert gate.check(cmd)[1] == 1


def test_a_result_survives_the_round_trip():
    data = {"uptime_s": 12, "errors": [1, 2], "raw": b"\x00\x01"}
    signed = command.encode_result(DEV_KEY, DEV_KID, "status", DEVICE, 42, command.OK,
                                   "done", data)
    assert len(signed) <= limits.RESULT_MAX_BYTES
    r = command_decode.decode_result(signed, DEV_KEY.public_key())
    assert (r.name, r.device, r.seq, r.outcome, r.detail, r.data, r.extra) == (
        "status", DEVICE, 42, "ok", "done", data, {})
    long = command.encode_result(DEV_KEY, DEV_KID, "rotate", DEVICE, 43, command.FAILED,
                                 "e" * (limits.RESULT_DETAIL_MAX_CHARS + 50))
    r = command_decode.decode_result(long, DEV_KEY.public_key())
    assert r.detail == "e" * limits.RESULT_DETAIL_MAX_CHARS and r.data is None


def test_a_result_signed_by_another_key_is_refused():
    signed = command.encode_result(FLEET, DEV_KID, "status", DEVICE, 1, command.OK)
    try:
        command_decode.decode_result(signed, DEV_KEY.public_key())
    except SignatureError:
        return
    raise AssertionError("a result signed by another key was taken")


def _payload_refused(body):
    """The reason a result with payload ``body`` is refused (signature checked first)."""
    signed = cose.encode_sign1(cbor.dumps(body), DEV_KEY, DEV_KID)
    try:
        command_decode.decode_result(signed, DEV_KEY.public_key())
    except MalformedError as e:
        return str(e)
    raise AssertionError("accepted %r" % (body,))


def test_a_result_that_breaks_a_rule_is_refused_with_the_field():
    good = {1: "status", 2: DEVICE, 3: 5, 4: "ok", 5: ""}
    assert command_decode.result_from_payload(cbor.dumps(good)).seq == 5

    def but(**change):
        body = dict(good)
        for k in change:
            key = int(k[1:])
            if change[k] is None:
                del body[key]
            else:
                body[key] = change[k]
        return body

    assert "name" in _payload_refused(but(k1="Status"))
    assert "name" in _payload_refused(but(k1=None))
    assert "device" in _payload_refused(but(k2="dev-1"))
    assert "seq" in _payload_refused(but(k3=-1))
    assert "seq" in _payload_refused(but(k3=limits.SEQ_MAX + 1))
    assert "seq" in _payload_refused(but(k3=True))
    assert "outcome" in _payload_refused(but(k4="maybe"))
    assert "detail" in _payload_refused(but(k5=b"bytes"))
    assert "detail" in _payload_refused(but(k5="d" * (limits.RESULT_DETAIL_MAX_CHARS + 1)))
    assert "data" in _payload_refused(but(k6=b"d" * limits.RESULT_DATA_MAX_BYTES))
    assert "keys" in _payload_refused({"1": "status", 2: DEVICE, 3: 5, 4: "ok"})
    assert "map" in _payload_refused([1, 2, 3])
    kept = command_decode.result_from_payload(cbor.dumps(but(k7="later")))
    assert kept.extra == {7: "later"} and kept.detail == ""


def test_command_names():
    for name in ("status", "rotate", "trust-store", "a", "x.y_z-1", "a" * 32):
        assert command.check_name(name) == name
    for bad in ("", "Status", "1st", "-x", "a b", "a/b", "é", "a" * 33, None, 5):
        try:
            command.check_name(bad)
        except MalformedError:
            continue
        raise AssertionError("accepted %r" % (bad,))
