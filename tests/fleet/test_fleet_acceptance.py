"""The fleet's acceptance rules (``acceptance``) as tables, without a database or a broker:
every rule, who is at fault, and when a publisher is quarantined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from cityedge_core import batch as batchmod
from cityedge_core import chain
from cityedge_fleet import acceptance
from cityedge_fleet.acceptance import FORGERY, MALFORMED, Acceptance
from cityedge_fleet.models import CommandState
from cityedge_fleet.models import DeviceState as S

GW = "urn:dev:mac:0000000000a1"
NODE = "urn:dev:mac:0000000000b1"
OTHER = "urn:dev:mac:0000000000c1"
KID = b"\x01" * 8


@dataclass
class Dev:
    id: str
    state: Any = S.active
    gateway_id: str | None = None


RULES = Acceptance(quarantine_after_forgeries=3, quarantine_after_malformed=10)


@pytest.mark.parametrize(("topic", "parsed"), [
    ("ce/v1/%s/up/readings" % GW, (GW, "readings")),
    ("ce/v1/%s/up/relay" % GW, (GW, "relay")),
    ("ce/v1/%s/up/result" % GW, (GW, "result")),
    ("ce/v1/%s/up/csr" % GW, (GW, "csr")),  # a key rotation's (rotation_ingest decides)
    ("ce/v1/%s/up/status" % GW, None),  # the ingest does not take status
    ("ce/v1/%s/down/cmd" % GW, None),
    ("ce/v1/not-a-urn/up/readings", None),
    ("ce/v1/urn:dev:mac:00\x00/up/readings", None),
    ("ce/v1/%s/up/readings/extra" % GW, None),
    ("", None),
])
def test_rule_1_the_topic(topic: str, parsed: tuple[str, str] | None) -> None:
    assert RULES.topic(topic) == parsed
    assert not RULES.bad_topic().recorded


@pytest.mark.parametrize(("device", "status"), [
    (None, acceptance.UNKNOWN_DEVICE),
    (Dev(GW, S.registered), acceptance.NOT_ACCEPTING),
    (Dev(GW, S.quarantined), acceptance.NOT_ACCEPTING),
    (Dev(GW, S.retired), acceptance.NOT_ACCEPTING),
    (Dev(GW, S.provisioned), None),
    (Dev(GW, S.active), None),
])
def test_rules_2_3_the_publisher(device: Dev | None, status: str | None) -> None:
    decision = RULES.publisher(GW, device)
    assert (decision.status if decision else None) == status
    if decision is not None:
        assert decision.device == GW and decision.strike is None


@pytest.mark.parametrize(("kind", "signer", "node", "status", "strike"), [
    # readings: only the publisher's own key
    ("readings", None, None, chain.UNKNOWN_KEY, None),
    ("readings", OTHER, None, acceptance.TOPIC_MISMATCH, None),
    ("readings", GW, None, None, None),
    # relay: a node's key, the node names this gateway, the node accepting
    ("relay", None, None, chain.UNKNOWN_KEY, None),
    ("relay", GW, None, acceptance.TOPIC_MISMATCH, None),
    ("relay", NODE, None, acceptance.NOT_RELAY_GATEWAY, MALFORMED),
    ("relay", NODE, Dev(NODE), acceptance.NOT_RELAY_GATEWAY, MALFORMED),
    ("relay", NODE, Dev(NODE, gateway_id=OTHER), acceptance.NOT_RELAY_GATEWAY, MALFORMED),
    ("relay", NODE, Dev(NODE, S.quarantined, GW), acceptance.NOT_ACCEPTING, None),
    ("relay", NODE, Dev(NODE, S.registered, GW), acceptance.NOT_ACCEPTING, None),
    ("relay", NODE, Dev(NODE, S.provisioned, GW), None, None),
    ("relay", NODE, Dev(NODE, S.active, GW), None, None),
])
def test_rules_5_to_8_who_signed(kind: str, signer: str | None, node: Dev | None,
                                 status: str | None, strike: str | None) -> None:
    decision = RULES.signer(kind, Dev(GW), KID, signer, node)
    assert (decision.status if decision else None) == status
    if decision is not None:
        assert (decision.device, decision.strike, decision.taken) == (GW, strike, False)
        assert decision.recorded


@pytest.mark.parametrize(("kind", "publisher", "node"), [
    ("readings", GW, None), ("result", GW, None), ("relay", GW, Dev(NODE, S.active, GW))])
def test_two_active_keys_of_one_device_both_sign_for_it(kind: str, publisher: str,
                                                       node: Dev | None) -> None:
    """During a key rotation's overlap a device has two active keys: the rules look at the
    device a key belongs to (the keyring's answer), so either key signs for it, and a key
    of another device does not."""
    signer = NODE if kind == "relay" else GW
    for kid in (b"\x01" * 8, b"\x02" * 8):  # the old key and the new one
        assert RULES.signer(kind, Dev(publisher), kid, signer, node) is None
    if kind != "relay":
        assert RULES.signer(kind, Dev(publisher), b"\x03" * 8, OTHER, None) is not None


@pytest.mark.parametrize("kind", ["readings", "relay"])
def test_a_bad_signature_or_a_bad_payload_is_the_publishers_fault(kind: str) -> None:
    forged = RULES.forged(kind, Dev(GW), "does not verify")
    assert (forged.status, forged.device, forged.strike) == (chain.BAD_SIGNATURE, GW, FORGERY)
    signer = GW if kind == "readings" else NODE
    bad = RULES.malformed(kind, Dev(GW), signer, "SenML: NaN", seq=7)
    assert (bad.status, bad.device, bad.seq, bad.strike) == (chain.MALFORMED, signer, 7,
                                                             MALFORMED)
    assert bad.via == (GW if kind == "relay" else None)
    envelope = RULES.malformed_envelope(Dev(GW), "not COSE")
    assert (envelope.device, envelope.strike) == (GW, MALFORMED)


def _verdict(status: str, device: str = GW) -> chain.Verdict:
    b = batchmod.Batch(device, 5, bytes(32), 1, [])
    return chain.Verdict(status, "why" if status not in chain.ACCEPTED else "", b)


@pytest.mark.parametrize(("status", "taken", "recorded"), [
    (chain.OK, True, False),
    (chain.GAP, True, True),
    (chain.REORDERED, True, True),
    (chain.FORK, True, True),
    (chain.DUPLICATE, False, True),
    (chain.REPLAY, False, True),
])
@pytest.mark.parametrize("kind", ["readings", "relay"])
def test_rule_11_the_chain_decides_what_is_stored(kind: str, status: str, taken: bool,
                                                  recorded: bool) -> None:
    device = GW if kind == "readings" else NODE
    d = RULES.placed(kind, Dev(GW), _verdict(status, device))
    assert (d.status, d.taken, d.recorded, d.device, d.seq, d.strike) == (
        status, taken, recorded, device, 5, None)
    assert d.via == (GW if kind == "relay" else None)


@pytest.mark.parametrize(("strike", "count", "quarantined"), [
    (FORGERY, 2, False), (FORGERY, 3, True), (FORGERY, 4, True),
    (MALFORMED, 9, False), (MALFORMED, 10, True),
])
def test_a_publisher_is_quarantined_when_its_strikes_reach_the_limit(
        strike: str, count: int, quarantined: bool) -> None:
    assert RULES.quarantines(strike, count) is quarantined


def test_every_refusal_names_whom_it_is_about() -> None:
    """No refusal that is recorded lacks a device; no strike is without one."""
    decisions = [RULES.publisher(GW, None), RULES.publisher(GW, Dev(GW, S.retired))]
    for kind in ("readings", "relay"):
        for signer in (None, GW, NODE, OTHER):
            for node in (None, Dev(NODE), Dev(NODE, S.retired, GW), Dev(NODE, S.active, GW)):
                decisions.append(RULES.signer(kind, Dev(GW), KID, signer, node))
    for d in decisions:
        if d is not None:
            assert d.device is not None and d.status and not d.taken


@dataclass
class Cmd:
    name: str = "status"
    state: Any = "sent"


@dataclass
class Res:
    name: str = "status"
    device: str = GW
    seq: int = 4
    outcome: str = "ok"


@pytest.mark.parametrize(("signer", "status", "strike"), [
    (None, chain.UNKNOWN_KEY, None),  # 5x
    (OTHER, acceptance.TOPIC_MISMATCH, None),  # 6x: another device's key on this topic
    (GW, None, None),
])
def test_rules_5x_6x_a_result_is_signed_by_its_publisher(signer: str | None,
                                                         status: str | None,
                                                         strike: str | None) -> None:
    d = RULES.signer("result", Dev(GW), KID, signer, None)
    assert (d.status if d else None, d.strike if d else None) == (status, strike)
    if d is not None:
        assert d.device == GW and d.detail.startswith("result: ")


def test_rule_9x_a_result_names_the_device_whose_key_signed_it() -> None:
    assert RULES.result_device(Dev(GW), GW, Res()) is None
    d = RULES.result_device(Dev(GW), GW, Res(device=OTHER))
    assert d is not None and (d.status, d.strike, d.device) == (chain.BAD_SIGNATURE, FORGERY,
                                                                GW)


@pytest.mark.parametrize(("command", "result", "status", "taken", "recorded"), [
    (None, Res(), acceptance.UNKNOWN_COMMAND, False, True),  # 10x
    (Cmd("rotate"), Res(), acceptance.RESULT_MISMATCH, False, True),  # 11x
    (Cmd(state="queued"), Res(), acceptance.RESULT, True, False),  # 12x
    (Cmd(state="sent"), Res(outcome="failed"), acceptance.RESULT, True, False),
    (Cmd(state="expired"), Res(), acceptance.RESULT, True, False),  # late, still the fact
    (Cmd(state="cancelled"), Res(outcome="refused"), acceptance.RESULT, True, False),
    (Cmd(state="ok"), Res(), acceptance.RESULT_DUPLICATE, False, False),
    (Cmd(state=CommandState.sent), Res(), acceptance.RESULT, True, False),  # the enum too
    (Cmd(state=CommandState.ok), Res(), acceptance.RESULT_DUPLICATE, False, False),
    (Cmd(state="ok"), Res(outcome="failed"), acceptance.RESULT_CONFLICT, False, True),
    (Cmd(state="refused"), Res(), acceptance.RESULT_CONFLICT, False, True),
])
def test_rules_10x_12x_a_result_answers_one_command_once(
        command: Cmd | None, result: Res, status: str, taken: bool, recorded: bool) -> None:
    d = RULES.answered(Dev(GW), command, result)
    assert (d.status, d.taken, d.recorded, d.device, d.seq, d.strike) == (
        status, taken, recorded, GW, 4, None)
