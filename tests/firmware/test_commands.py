"""The command gate: only fleet-signed commands for this device, in time, never replayed."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import cbor, command, cose, p256
from cityedge_core import command_gate as commands
from cityedge_core.errors import MalformedError, PeerError, SignatureError, UnknownKeyError

DEVICE = "urn:dev:mac:0024befffe804ff1"
NOW = 1_800_000_000
FLEET = p256.PrivateKey(0x1234567890ABCDEF)
FLEET_KID = cose.kid_for_public_key(FLEET.public_key().to_sec1())
ROGUE = p256.PrivateKey(0xBADBADBAD)


class MemState:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, **kv: Any) -> None:
        self.values.update(kv)


def gate(clock: Any = lambda: NOW, **kw: Any) -> commands.CommandGate:
    return commands.CommandGate(DEVICE, {FLEET_KID: FLEET.public_key()}, MemState(), clock,
                                **kw)


def cmd(seq: int = 1, name: str = "status", target: str = DEVICE, expires: int = NOW + 60,
        signer: Any = FLEET, kid: bytes = FLEET_KID, args: Any = None) -> bytes:
    return command.encode_command(signer, kid, name, target, seq, expires, args)


def test_valid_command_is_accepted_once() -> None:
    g = gate()
    c = g.check(cmd(1, "desired", args={"sample_interval_s": 30}))
    assert c == ("desired", 1, {"sample_interval_s": 30})
    with pytest.raises(commands.CommandRefused, match="replay"):
        g.check(cmd(1))
    with pytest.raises(commands.CommandRefused, match="replay"):
        g.check(cmd(0))
    assert g.check(cmd(5))[1] == 5
    assert g.state.get("cmd_seq") == 5


def test_forged_signature_is_refused() -> None:
    # signed by another key that claims the fleet key's kid
    with pytest.raises(SignatureError):
        gate().check(cmd(signer=ROGUE))
    rogue_kid = cose.kid_for_public_key(ROGUE.public_key().to_sec1())
    with pytest.raises(UnknownKeyError):
        gate().check(cmd(signer=ROGUE, kid=rogue_kid))


def test_payload_changed_after_signing_is_refused() -> None:
    good = cose.decode_sign1(cmd())
    body = cbor.loads(good.payload)
    body[3] = 99  # seq
    forged = cbor.dumps(cbor.Tag(18, [good.protected_raw, {}, cbor.dumps(body),
                                      good.signature]))
    with pytest.raises(SignatureError):
        gate().check(forged)


def test_expired_and_wrong_target_are_refused() -> None:
    with pytest.raises(commands.CommandRefused, match="expired"):
        gate().check(cmd(expires=NOW))
    with pytest.raises(commands.CommandRefused, match="not this device"):
        gate().check(cmd(target="urn:dev:mac:0024befffe804ff2"))


def test_no_clock_refuses_unless_allowed() -> None:
    with pytest.raises(commands.CommandRefused, match="clock"):
        gate(clock=lambda: None).check(cmd())
    assert gate(clock=lambda: None, require_clock=False).check(cmd())[1] == 1


def test_malformed_commands() -> None:
    for body in ({1: "x"}, {1: "x", 2: DEVICE, 3: -1, 4: NOW + 5}, [1, 2],
                 {1: 5, 2: DEVICE, 3: 1, 4: NOW + 5}, {1: "x", 2: DEVICE, 3: True, 4: NOW + 5}):
        data = cose.encode_sign1(cbor.dumps(body), FLEET, FLEET_KID)
        with pytest.raises(MalformedError):
            gate().check(data)
    with pytest.raises(MalformedError):
        gate().check(b"\xd2\x84" + b"\x00" * (commands.MAX_COMMAND_BYTES + 1))


_GOOD = cmd(7)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(_GOOD) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused(pos: int, xor: int) -> None:
    data = bytearray(_GOOD)
    data[pos] ^= xor
    with pytest.raises(PeerError):
        gate().check(bytes(data))
