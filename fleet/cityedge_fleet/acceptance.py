"""The fleet's acceptance of a message: the one place that decides whether a signed batch
(or a device's signed command result) arriving on a topic is taken, and who is at fault
when it is not.

I/O-free: it is given the parsed topic, the devices the registry holds (anything with
``id``, ``state`` and ``gateway_id``: ``models.Device``, or a plain record in the tests)
and what the core's ``BatchVerifier`` found, and returns a ``Decision`` that the ingest
(``ingest.Ingestor``) stores. The broker has already authenticated the publisher (it may
write only under its own certificate's CN: ``broker_acl``). The rules, in order; the
first that refuses decides:

====  ==================================================  ==========================  ======
 #    rule                                                refused as                  strike
====  ==================================================  ==========================  ======
 1    the topic is ``ce/v1/<urn>/up/readings|relay|``     ``bad_topic`` (not kept)
      ``result|csr`` (a ``csr``, a key rotation's request,
      goes to ``rotation_ingest``'s own rules)
 2    the publisher is registered                         ``unknown_device``
 3    ... and provisioned or active                       ``not_accepting``
 4    the envelope is a COSE_Sign1                        ``malformed``               M
 5    its kid names a trusted (active) key                ``unknown_key``
 6r   readings: the key is the publisher's own            ``topic_mismatch``
 6g   relay: the key is not the gateway's own             ``topic_mismatch``
 7g   relay: the signer names the publisher as its        ``not_relay_gateway``       M
      gateway (``Device.gateway_id``)
 8g   relay: the signer is provisioned or active          ``not_accepting``
 9    the signature holds, the payload names the key's    ``bad_signature``           F
      device
 10   the payload is a batch within the core's rules      ``malformed``               M
 11   its place on the chain: ok, gap, reordered, fork    (stored); ``duplicate``,
      are taken                                           ``replay`` recorded
 12   its SenML records resolve                           ``malformed``               M
====  ==================================================  ==========================  ======

A strike counts against the *publisher* — on the relay topic the gateway, which published
the bytes and checks node batches before forwarding them: F a forgery, M a malformed
message. A publisher is quarantined when its count reaches ``quarantine_after_forgeries``
or ``quarantine_after_malformed`` (``quarantines``).

A **result** (``up/result``: the device's answer to a fleet command,
``cityedge_core.command``) passes rules 1-3, then its own (``command_decode`` reads it):

====  ==================================================  ==========================  ======
 #    rule                                                refused as                  strike
====  ==================================================  ==========================  ======
 4x   the envelope is a COSE_Sign1 with a kid             ``malformed``               M
 5x   its kid names a trusted (active) key                ``unknown_key``
 6x   the key is the publisher's own                      ``topic_mismatch``
 7x   the signature holds                                 ``bad_signature``           F
 8x   the payload is a result within the core's rules     ``malformed``               M
 9x   the result names the key's device                   ``bad_signature``           F
 10x  it answers a command of that device with that seq   ``unknown_command``
 11x  ... with that command's name                        ``result_mismatch``
 12x  the command has no answer yet (else the same one    ``result_duplicate`` (not
      again is ignored, another is kept as a conflict)    recorded), ``result_conflict``
====  ==================================================  ==========================  ======

A taken result (``result``) is stored on its command (``command_queue.record_result``),
even one the fleet had given up on (``expired``, ``cancelled``: it is what the device did).
So a device can answer only its own commands: the broker lets it publish under its own id
only, and the key, the topic and the payload must all name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cityedge_core import batch as batchmod
from cityedge_core import chain, topics
from cityedge_core.errors import PeerError
from cityedge_fleet.models import DeviceState

BAD_TOPIC = "bad_topic"
UNKNOWN_DEVICE = "unknown_device"  # the topic names no registered device
NOT_ACCEPTING = "not_accepting"  # the device is registered, quarantined or retired
TOPIC_MISMATCH = "topic_mismatch"  # signed by a key of another device than the topic's
NOT_RELAY_GATEWAY = "not_relay_gateway"  # a relayed node does not name the publisher
UNKNOWN_COMMAND = "unknown_command"  # a result for a seq the device was never sent
RESULT_MISMATCH = "result_mismatch"  # a result naming another command than that seq's
RESULT_DUPLICATE = "result_duplicate"  # the same answer again (a re-sent command)
RESULT_CONFLICT = "result_conflict"  # another answer to an answered command (kept aside)
RESULT = "result"  # a result taken
READINGS = topics.READINGS
RELAY = topics.RELAY
RESULTS = topics.RESULT  # the topic kind
CSRS = topics.CSR  # a key rotation's request (``rotation_ingest`` decides)
FORGERY = "forgeries"  # strikes, named as the device's counters
MALFORMED = "malformed"
ACCEPTING = (DeviceState.provisioned, DeviceState.active)
ANSWERED = ("ok", "refused", "failed")  # a command's states once its device answered
GIVEN_UP = ("expired", "cancelled")  # states in which the fleet stopped sending it
_PREFIX = {RELAY: "relay: ", RESULTS: "result: "}  # of a refusal's detail, by topic kind


class DeviceLike(Protocol):
    id: str
    state: Any
    gateway_id: str | None


class CommandLike(Protocol):
    name: str
    state: Any


class ResultLike(Protocol):
    name: str
    device: str
    seq: int
    outcome: str


@dataclass(frozen=True)
class Decision:
    """What to store for one message."""

    status: str  # a chain verdict's status, or one of this module's
    device: str | None = None  # the device the event (or the readings) is about
    via: str | None = None  # the gateway that relayed the batch
    detail: str = ""
    seq: int | None = None
    strike: str | None = None  # FORGERY or MALFORMED, counted against the publisher
    recorded: bool = True  # an IngestEvent is written (not for ``bad_topic``, nor ``ok``)
    taken: bool = False  # the batch is stored (readings, or a drop record)


class Acceptance:
    """The rules above, with the quarantine thresholds of ``FleetLimits``."""

    def __init__(self, quarantine_after_forgeries: int, quarantine_after_malformed: int
                 ) -> None:
        self.limits = {FORGERY: quarantine_after_forgeries,
                       MALFORMED: quarantine_after_malformed}

    # -- 1-3: the topic and its publisher ------------------------------------------------

    @staticmethod
    def topic(topic: str) -> tuple[str, str] | None:
        """``(publisher, kind)`` of a topic the ingest takes, else None (rule 1)."""
        parsed = topics.parse(topic)
        if parsed is None or parsed[1] != topics.UP or parsed[2] not in (READINGS, RELAY,
                                                                          RESULTS, CSRS):
            return None
        try:
            batchmod.check_device_id(parsed[0])
        except PeerError:
            return None
        return parsed[0], parsed[2]

    @staticmethod
    def bad_topic() -> Decision:
        return Decision(BAD_TOPIC, recorded=False)

    @staticmethod
    def publisher(publisher_id: str, publisher: DeviceLike | None) -> Decision | None:
        """Rules 2-3; None when the publisher may send."""
        if publisher is None:
            return Decision(UNKNOWN_DEVICE, publisher_id, detail="not registered")
        if publisher.state not in ACCEPTING:
            return Decision(NOT_ACCEPTING, publisher_id,
                            detail="device is %s" % publisher.state)
        return None

    # -- 4-8: the envelope and who signed ---------------------------------------------------

    @staticmethod
    def malformed_envelope(publisher: DeviceLike, reason: str, kind: str = READINGS
                           ) -> Decision:
        """Rule 4 (4x)."""
        return Decision(chain.MALFORMED, publisher.id, detail=_PREFIX.get(kind, "") + reason,
                        strike=MALFORMED)

    @staticmethod
    def signer(kind: str, publisher: DeviceLike, kid: bytes | None, signer_id: str | None,
               node: DeviceLike | None) -> Decision | None:
        """Rules 5-8 (5x-6x for a result) for the key ``kid`` (``signer_id``: its device,
        None if no trusted key has it; ``node``: that device, on the relay topic); None
        when it may sign."""
        relay = kind == RELAY
        prefix = _PREFIX.get(kind, "")
        if signer_id is None:
            return Decision(chain.UNKNOWN_KEY, publisher.id, detail="%skey %s is not trusted"
                            % (prefix, kid.hex() if kid else "(none)"))
        if not relay:
            if signer_id != publisher.id:
                return Decision(TOPIC_MISMATCH, publisher.id,
                                detail="%ssigned with a key of %s" % (prefix, signer_id))
            return None
        if signer_id == publisher.id:
            return Decision(TOPIC_MISMATCH, publisher.id,
                            detail="relay: the gateway's own batch on its relay topic")
        if node is None or node.gateway_id != publisher.id:
            named = (node.gateway_id if node is not None else None) or "no gateway"
            return Decision(NOT_RELAY_GATEWAY, publisher.id, strike=MALFORMED,
                            detail="relay: node %s reports through %s" % (signer_id, named))
        if node.state not in ACCEPTING:
            return Decision(NOT_ACCEPTING, publisher.id,
                            detail="relay: relayed node %s is %s" % (signer_id, node.state))
        return None

    # -- 9-12: the signature, the payload, the chain, the records --------------------------

    @staticmethod
    def forged(kind: str, publisher: DeviceLike, reason: str) -> Decision:
        """Rule 9: the publisher sent bytes whose signature does not hold."""
        return Decision(chain.BAD_SIGNATURE, publisher.id, strike=FORGERY,
                        detail=_PREFIX.get(kind, "") + reason)

    @staticmethod
    def malformed(kind: str, publisher: DeviceLike, device: str, reason: str,
                  seq: int | None = None) -> Decision:
        """Rules 10 and 12: about ``device`` (the signer), counted against the publisher."""
        via = publisher.id if kind == RELAY else None
        detail = reason if via is None else "relayed by %s: %s" % (via, reason)
        if kind == RESULTS:
            detail = _PREFIX[RESULTS] + reason
        return Decision(chain.MALFORMED, device, via, detail, seq, strike=MALFORMED)

    @staticmethod
    def placed(kind: str, publisher: DeviceLike, verdict: chain.Verdict) -> Decision:
        """Rule 11: a verified batch's place on its device's chain."""
        b = verdict.batch
        via = publisher.id if kind == RELAY else None
        if verdict.accepted:
            return Decision(verdict.status, b.device, via,
                            "" if via is None else "relayed by %s" % via, b.seq,
                            recorded=verdict.status != chain.OK, taken=True)
        detail = verdict.reason if via is None else "relayed by %s: %s" % (via,
                                                                           verdict.reason)
        return Decision(verdict.status, b.device, via, detail, b.seq)

    # -- 9x-12x: a result and the command it answers -------------------------------------

    @staticmethod
    def result_device(publisher: DeviceLike, signer_id: str, result: ResultLike
                      ) -> Decision | None:
        """Rule 9x: a result names the device whose key signed it."""
        if result.device != signer_id:
            return Decision(chain.BAD_SIGNATURE, publisher.id, seq=result.seq,
                            strike=FORGERY, detail="result: names device %s, signed with "
                            "a key of %s" % (result.device, signer_id))
        return None

    @staticmethod
    def answered(publisher: DeviceLike, command: CommandLike | None, result: ResultLike
                 ) -> Decision:
        """Rules 10x-12x: what a verified result of ``publisher`` does to ``command``, the
        one of that device with the result's seq (None: there is none)."""
        seq = result.seq
        if command is None:
            return Decision(UNKNOWN_COMMAND, publisher.id, seq=seq,
                            detail="result: no command %d was sent to this device" % seq)
        if command.name != result.name:
            return Decision(RESULT_MISMATCH, publisher.id, seq=seq,
                            detail="result: names command %s, command %d is %s"
                            % (result.name, seq, command.name))
        state = str(getattr(command.state, "value", command.state))
        if state in ANSWERED:
            if state == result.outcome:
                return Decision(RESULT_DUPLICATE, publisher.id, seq=seq, recorded=False,
                                detail="result: command %d answered %s already" % (seq, state))
            return Decision(RESULT_CONFLICT, publisher.id, seq=seq,
                            detail="result: command %d answered %s already, now %s (kept "
                            "the first)" % (seq, state, result.outcome))
        late = " (after the fleet marked it %s)" % state if state in GIVEN_UP else ""
        return Decision(RESULT, publisher.id, seq=seq, recorded=False, taken=True,
                        detail="%s%s" % (result.outcome, late))

    # -- quarantine ---------------------------------------------------------------------

    def quarantines(self, strike: str, count: int) -> bool:
        """True when a publisher's ``count`` of ``strike`` reaches its limit."""
        return count >= self.limits[strike]
