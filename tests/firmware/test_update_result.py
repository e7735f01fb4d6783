"""The update's signed result on CPython, with the firmware's own ``update_check`` (the
boot's decision and hand-off), ``update_agent``, ``update_slots``, ``answers`` and
``store.State`` on real files: a power cut at each step
between the decision and the publish (the signature, the kept answer's write, the
publish, the state's write) still ends in one answer, published once connected, the same
bytes a resend of the command gets; and the outcome each decision maps to is the one the
fleet's campaign reads (``ota.member_status``). The end-to-end cases (commit, rollback by
the deadline and by the selector, refusals, on the unix port against Mosquitto) are in
``test_update.py``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cityedge_core import cose, p256
from cityedge_core.command_decode import decode_result
from cityedge_core.command_gate import CommandRefused
from cityedge_fw import answers, files, mqtt, store, update_agent, update_check, update_slots
from cityedge_host.crypto import EcVerifier

KEY = p256.PrivateKey(0xC0FFEE)
KID = cose.kid_for_public_key(KEY.public_key().to_sec1())
DEVICE = "urn:dev:mac:0024befffe804ff1"
SEQ = 7


class Cut(BaseException):
    """The power went (a ``BaseException``: nothing in the firmware catches it)."""


def device(tmp: Path, published: list[bytes], cut_publish: bool = False) -> Any:
    """An agent as ``update_agent`` and ``answers`` see it, its state read from flash."""
    async def publish(topic: str, data: bytes, qos: int = 0) -> None:
        if cut_publish:
            raise Cut
        assert topic == "ce/v1/%s/up/result" % DEVICE and qos in (0, 1)
        published.append(bytes(data))

    client = SimpleNamespace(state=mqtt.CONNECTED, can_publish=lambda: True)
    # what the boot hands the agent (``update_check._update``: the answer owed)
    u = {"dir": str(tmp / "flash")}
    update_check._update({"store": {"state": str(tmp / "state.cbor")}, "update": u}, u)
    hand = tmp / "flash" / update_check.HANDOFF  # as ``update_agent.run`` reads it
    if hand.exists():
        u["owed"] = json.loads(hand.read_text())["owed"]
        hand.unlink()
    return SimpleNamespace(
        device=DEVICE, writer=SimpleNamespace(signer=KEY, kid=KID),
        state=store.State(str(tmp / "state.cbor")),
        cfg={"update": u},
        link=SimpleNamespace(client=client, publish=publish),
        topics=("ce/v1/%s/up/readings" % DEVICE,))


def decided(tmp: Path, last: list[Any]) -> None:
    (tmp / "flash").mkdir(exist_ok=True)
    (tmp / "flash" / update_slots.POINTER).write_text(  # as ``update_slots`` writes it
        json.dumps({"slot": "b", "seq": 2, "last": last}))
    store.State(str(tmp / "state.cbor")).set(update_cmd=[None, None, SEQ])


def verify(data: bytes) -> Any:
    return decode_result(data, EcVerifier.from_sec1(KEY.public_key().to_sec1()))


@pytest.mark.parametrize("cut", ["none", "sign", "keep", "publish", "state"])
def test_the_result_survives_a_cut_between_the_decision_and_the_publish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str) -> None:
    decided(tmp_path, ["committed", "1.1.0", 2, ""])
    published: list[bytes] = []
    real_write, real_encode = files.write_atomic, answers._encode

    def cut_at(step: str, real: Any) -> Any:
        def f(*a: Any, **k: Any) -> Any:
            if step == cut:
                raise Cut
            return real(*a, **k)
        return f

    first = device(tmp_path, published, cut_publish=cut == "publish")  # the boot, then
    monkeypatch.setattr(answers, "_encode", cut_at("sign", real_encode))
    monkeypatch.setattr(answers, "write_atomic", cut_at("keep", real_write))
    monkeypatch.setattr(store.State, "set", cut_at("state", store.State.set))
    first.state = store.State(str(tmp_path / "state.cbor"))
    if cut == "none":
        asyncio.run(update_agent._answer(first))
    else:
        with pytest.raises(Cut):
            asyncio.run(update_agent._answer(first))
    monkeypatch.undo()  # the power is back: the next start, its state read from flash
    again = device(tmp_path, published)
    asyncio.run(update_agent._answer(again))
    assert again.state.get("update_cmd") is None
    assert store.State(str(tmp_path / "state.cbor")).get("update_cmd") is None
    assert published, cut
    res = verify(published[-1])
    assert (res.name, res.seq, res.outcome) == ("update", SEQ, "ok")
    assert res.data == {"state": "committed", "version": "1.1.0", "sequence": 2}
    # the same bytes every time: what was kept is sent again, never signed anew
    assert len(set(published)) == 1, cut
    # a resend of the command (the gate: a replay) gets the kept bytes once more
    asyncio.run(answers.send(again, CommandRefused("replay", "update", SEQ, True), None,
                             None))
    assert published[-1] == published[0]
    # and once answered, a later start answers nothing again
    n = len(published)
    asyncio.run(update_agent._answer(device(tmp_path, published)))
    assert len(published) == n


OUTCOMES = [
    (["committed", "1.1.0", 2, ""], "ok", "committed"),
    (["rolled-back", "1.1.0", 2, "health: broker not reached within 20 s (x)"], "failed",
     "rolled-back"),
    (["rolled-back", "1.2.0", 3, "the new release did not commit within 3 boots"],
     "failed", "rolled-back"),
    (["failed", "1.1.0", 6, "rollback: sequence 4 is not above 5"], "refused", "failed"),
    (["failed", None, None, "manifest_digest: the manifest is not the one the command "
      "names"], "refused", "failed"),
    (["failed", None, None, "malformed: update arguments"], "refused", "failed"),
    (["failed", "1.1.0", 6, "artifact_digest: the artifact's SHA-256 differs"], "failed",
     "failed"),
    (["failed", "1.1.0", 6, "download: failed 6 times: timeout"], "failed", "failed"),
    (["failed", None, None, "fetch: failed 6 times: refused"], "failed", "failed"),
]


@pytest.mark.parametrize(("last", "outcome", "member"), OUTCOMES,
                         ids=[o[0][3].split(":")[0] or o[0][0] for o in OUTCOMES])
def test_each_decision_is_the_result_the_campaign_reads(last: list[Any], outcome: str,
                                                        member: str) -> None:
    from cityedge_core import cbor
    from cityedge_fleet import ota, ota_store

    kind, detail, data = update_check.outcome(last)
    assert kind == outcome
    facts = ota.CommandFacts(kind, sends=1, attempts=1, detail=detail,
                             result_state=ota_store._result_state(cbor.dumps(data)))
    assert ota.member_status(facts)[0] == member
