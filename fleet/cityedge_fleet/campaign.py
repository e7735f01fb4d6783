"""Rotation campaigns: the one policy that decides which devices a campaign selects, which
it starts when, and when it halts or ends. I/O-free (``campaign_store`` reads and writes
the database, ``campaign_runner`` runs it in ``fleet serve``); tested as tables and as a
hypothesis state machine in ``tests/fleet/test_fleet_campaign_policy.py``.

**Selectors** (``parse_selector``): comma-separated terms, all of which must hold::

    site=harbour,model=ce-air-1,key-age>60d,cert-expiry<30d,tag!=pilot

====================  ============  ==========================================================
 key                  operators     matches
====================  ============  ==========================================================
 ``site``, ``model``,  ``=`` ``!=``  the registry's field (``hardware-class``; ``firmware`` is
 ``hardware-class``,                 the firmware version; ``state`` the device's state);
 ``firmware``,                       ``a|b`` is either value
 ``state``
 ``tag``               ``=`` ``!=``  ``=``: the device has the tag; ``!=``: it has not
 ``intermediate``      ``=`` ``!=``  the id (16 hex characters, ``cityedge ca status``) of the
                                     intermediate CA that issued the device's current
                                     certificate: ``intermediate=<old id>`` moves every
                                     device onto the new intermediate after a CA rollover
 ``key-age``           ``>`` ``<``   time since the device's current certificate was issued
                       ``>=`` ``<=``
 ``cert-expiry``       (same)        time until it expires (``cert-expiry<30d``: within 30 days)
====================  ============  ==========================================================

Durations are a whole number and a unit: ``s``, ``m``, ``h``, ``d``, ``w``. ``all`` alone
selects every device; an empty selector is an error (a campaign never selects everything
by accident). A text key given twice with ``=`` is an error (it could only select
nothing). Every error is a ``SelectorError`` naming the term and what is allowed.

**The campaign's rules** (``decide``), in order; the first that applies decides:

====  =====================================================================================
 #    rule
====  =====================================================================================
 1    a campaign that is not ``running`` (``paused``, ``halted``, ``aborted``, ``done``)
      starts nothing
 2    more failures than it allows (``allowed_failures``; ``--max-failures 5%`` of the
      members, rounded down, or a count) halt it: ``halted``, nothing more is started
 3    every member ``done`` or ``failed``: the campaign is ``done``
 4    members due for a retry (``retry``, ``next_try_at`` passed) start again, in their
      own wave (a member is in one wave, ever)
 5    the current wave is *settled* (each of its members ``done``, ``failed``, ``offline``
      or ``retry``) and members are ``waiting``: the next ``wave_size`` of them, in
      member order, are the next wave
====  =====================================================================================

A member's status comes from its device's ``KeyRotation`` (``member_status``):
``pending`` or ``sent`` with the rotate command tried but never delivered (the broker had
no subscription of the device) is ``offline`` (the publisher sends it again when the device
is back, and an offline member does not hold its wave: one device away, or stolen and
silent, cannot stall a campaign); ``sent`` not tried yet or delivered, ``csr-received`` and
``issued`` are ``active``; ``proven`` and ``old-revoked`` are ``done``
(``proven``: the new key is in use and the old certificate revoked; the device's erase of
the old key follows); ``failed`` is ``retry`` when the rotate command expired or was
cancelled without ever reaching the device and tries are left (``max_attempts``; the wait
doubles from ``retry_base_s`` to ``retry_max_s``), else ``failed`` with the rotation's
reason (a refusal by the device, a bad CSR, a device that vanished mid-rotation): those
count toward the threshold. A device the fleet could not start (it was quarantined or
revoked after selection) is ``failed`` with the refusal as its reason.

An aborted campaign starts nothing; the store fails its members' rotations that have not
reached their device yet (``ABORTABLE``) and leaves the others to finish (a rotation under
way is safe to complete; failing one never revokes anything). Pause and resume move only
``running`` and ``paused``; ``halted``, ``aborted`` and ``done`` are final.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

# ------------------------------------------------------------------ limits (with units)


@dataclass(frozen=True)
class CampaignLimits:
    """Limits of campaigns, each with its unit."""

    wave_max: int = 10_000  # devices in one wave
    members_max: int = 100_000  # devices in one campaign
    confirm_over: int = 100  # devices a campaign may select without --yes / confirm
    max_attempts: int = 3  # rotations started for a member never reached, at most
    retry_base_s: float = 600.0  # seconds before the first retry of an unreached member
    retry_max_s: float = 6 * 3600.0  # seconds: the longest wait between retries
    runner_every_s: float = 5.0  # seconds between the runner's rounds in fleet serve
    selector_max_chars: int = 1024  # characters of a selector
    selector_terms_max: int = 32  # terms in a selector


LIMITS = CampaignLimits()


# ------------------------------------------------------------------------- selectors


class SelectorError(ValueError):
    """A selector that does not parse; the message names the term and what is allowed."""


TEXT_KEYS = {"site": "site", "model": "model", "hardware-class": "hardware_class",
             "hardware_class": "hardware_class", "firmware": "firmware", "state": "state",
             "intermediate": "issuer"}
TIME_KEYS = ("key-age", "cert-expiry")
KEYS = tuple(sorted({*TEXT_KEYS, "tag", *TIME_KEYS} - {"hardware_class"}))
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TERM = re.compile(r"^\s*([a-z_-]+)\s*(!=|>=|<=|=|>|<)\s*(.*?)\s*$")
_DURATION = re.compile(r"^([0-9]{1,9})([smhdw])$")
_INTERMEDIATE_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class DeviceFacts:
    """What a selector looks at, for one device (``campaign_store`` reads it)."""

    id: str
    site: str = ""
    model: str = ""
    hardware_class: str = ""
    firmware: str = ""
    state: str = "active"
    tags: frozenset[str] = frozenset()
    key_issued_at: float | None = None  # UNIX seconds: the current certificate's notBefore
    cert_expires_at: float | None = None  # UNIX seconds: its notAfter
    issuer: str = ""  # the id of the intermediate that issued it ("": none or not known)


@dataclass(frozen=True)
class Term:
    key: str
    op: str
    values: tuple[str, ...] = ()
    seconds: int = 0

    def holds(self, d: DeviceFacts, now: float) -> bool:
        if self.key == "tag":
            has = any(v in d.tags for v in self.values)
            return has if self.op == "=" else not has
        if self.key in TEXT_KEYS:
            value = getattr(d, TEXT_KEYS[self.key])
            return (value in self.values) == (self.op == "=")
        at = d.key_issued_at if self.key == "key-age" else d.cert_expires_at
        if at is None:
            return False  # no current certificate: no age, no expiry
        got = now - at if self.key == "key-age" else at - now
        return {">": got > self.seconds, "<": got < self.seconds,
                ">=": got >= self.seconds, "<=": got <= self.seconds}[self.op]

    def text(self) -> str:
        if self.key in TIME_KEYS:
            return "%s%s%s" % (self.key, self.op, _duration_text(self.seconds))
        return "%s%s%s" % (self.key, self.op, "|".join(self.values))


@dataclass(frozen=True)
class Selector:
    terms: tuple[Term, ...]  # empty: ``all``

    def matches(self, d: DeviceFacts, now: float) -> bool:
        return all(t.holds(d, now) for t in self.terms)

    def text(self) -> str:
        """The canonical form (stored with the campaign, shown in its status)."""
        return ",".join(t.text() for t in self.terms) or "all"


def _duration_text(seconds: int) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % UNITS_S[unit] == 0:
            return "%d%s" % (seconds // UNITS_S[unit], unit)
    return "%ds" % seconds


def parse_duration(text: str) -> int:
    """``60d`` -> seconds (SelectorError otherwise)."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise SelectorError("%r is not a duration: a whole number and s, m, h, d or w "
                            "(e.g. 60d)" % text)
    return int(m.group(1)) * UNITS_S[m.group(2)]


def parse_selector(text: str, lim: CampaignLimits = LIMITS) -> Selector:
    """The selector ``text`` (grammar in the module docstring)."""
    if len(text) > lim.selector_max_chars:
        raise SelectorError("the selector is over %d characters" % lim.selector_max_chars)
    if not text.strip():
        raise SelectorError("the selector is empty: name what to select (e.g. "
                            "'site=harbour,key-age>60d'), or 'all' for every device")
    if text.strip() == "all":
        return Selector(())
    parts = text.split(",")
    if len(parts) > lim.selector_terms_max:
        raise SelectorError("the selector has over %d terms" % lim.selector_terms_max)
    terms: list[Term] = []
    equals: set[str] = set()
    for part in parts:
        m = _TERM.match(part)
        if m is None:
            raise SelectorError("%r is not a term: write KEY=VALUE, KEY!=VALUE or, for "
                                "key-age and cert-expiry, KEY>DURATION (keys: %s)"
                                % (part.strip(), ", ".join(KEYS)))
        key, op, value = m.groups()
        if key not in TEXT_KEYS and key != "tag" and key not in TIME_KEYS:
            raise SelectorError("%r: unknown key %r (keys: %s)" % (part.strip(), key,
                                                                   ", ".join(KEYS)))
        if key in TIME_KEYS:
            if op in ("=", "!="):
                raise SelectorError("%r: %s takes >, <, >= or <= and a duration (e.g. "
                                    "%s>60d)" % (part.strip(), key, key))
            terms.append(Term(key, op, seconds=parse_duration(value)))
            continue
        if op not in ("=", "!="):
            raise SelectorError("%r: %s takes = or != (a value, or a|b for either)"
                                % (part.strip(), key))
        values = tuple(v.strip() for v in value.split("|"))
        if not all(values) or (key != "state" and "" in values):
            raise SelectorError("%r: empty value (write %s=VALUE)" % (part.strip(), key))
        if key == "intermediate" and not all(_INTERMEDIATE_ID.match(v) for v in values):
            raise SelectorError("%r: an intermediate is named by its id, 16 lower-case hex "
                                "characters (`cityedge ca status` lists them)" % part.strip())
        canonical = TEXT_KEYS.get(key, key)
        if op == "=" and canonical != "tag":
            if canonical in equals:
                raise SelectorError("%r: %s is given twice with = (it would select "
                                    "nothing; use a|b for either)" % (part.strip(), key))
            equals.add(canonical)
        terms.append(Term("hardware-class" if canonical == "hardware_class" else key, op,
                          values))
    return Selector(tuple(terms))


# ------------------------------------------------------------------ campaign policy


class CampaignState(StrEnum):
    running = "running"
    paused = "paused"
    halted = "halted"  # the failure threshold was crossed
    aborted = "aborted"
    done = "done"


FINAL = (CampaignState.halted, CampaignState.aborted, CampaignState.done)


class MemberStatus(StrEnum):
    waiting = "waiting"  # in no wave yet
    offline = "offline"  # its rotate command has not reached the device yet
    active = "active"  # the device is rotating
    retry = "retry"  # never reached, tried again at next_try_at
    done = "done"
    failed = "failed"


SETTLED = (MemberStatus.done, MemberStatus.failed, MemberStatus.offline, MemberStatus.retry)
FINISHED = (MemberStatus.done, MemberStatus.failed)
# rotation states (``models.RotationState`` values) whose device was not reached yet:
# an aborted campaign fails them (when the rotate command was never delivered)
ABORTABLE = ("pending", "sent")
UNREACHED_PREFIXES = ("rotate expired", "rotate cancelled")


class CampaignError(ValueError):
    """An operation the campaign's state refuses (409), or bad parameters (422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_max_failures(text: str, members: int) -> int:
    """``5%`` (of ``members``, rounded down) or ``5`` -> the failures a campaign allows."""
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 <= pct <= 100:
                raise ValueError(t)
            return int(members * pct / 100)
        n = int(t)
        if n < 0:
            raise ValueError(t)
        return n
    except ValueError as e:
        raise CampaignError(422, "max failures %r: a count (e.g. 5) or a percentage of the "
                            "devices (e.g. 5%%) from 0 to 100" % text) from e


def member_status(rotation_state: str | None, reason: str, rotate_delivered: bool,
                  attempts: int, max_attempts: int, rotate_tried: bool = True
                  ) -> MemberStatus:
    """A started member's status from its latest rotation (module docstring):
    ``rotate_tried``: the publisher has tried its rotate command (the broker answered),
    ``rotate_delivered``: ... and the device was there."""
    if rotation_state is None:
        return MemberStatus.waiting
    if rotation_state in ("pending", "sent"):
        if rotate_delivered or not rotate_tried:
            return MemberStatus.active  # rotating, or its command not tried yet
        return MemberStatus.offline
    if rotation_state in ("csr-received", "issued"):
        return MemberStatus.active
    if rotation_state in ("proven", "old-revoked"):
        return MemberStatus.done
    unreached = not rotate_delivered and reason.startswith(UNREACHED_PREFIXES)
    if unreached and attempts < max_attempts:
        return MemberStatus.retry
    return MemberStatus.failed


def retry_wait_s(attempts: int, lim: CampaignLimits = LIMITS) -> float:
    """Seconds before the next try of a member tried ``attempts`` times (doubling)."""
    return float(min(lim.retry_max_s, lim.retry_base_s * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Member:
    device_id: str
    status: MemberStatus = MemberStatus.waiting
    wave: int | None = None  # the wave it was started in
    next_try_at: float | None = None  # UNIX seconds (``retry``)


@dataclass
class Plan:
    """What ``decide`` asks the store to do."""

    state: CampaignState
    wave: int  # the current wave after this round
    start: list[str] = field(default_factory=list)  # device ids to start (or restart)
    why: str = ""  # why the state changed, for the audit


def counts(members: Iterable[Member]) -> dict[str, int]:
    out = {s.value: 0 for s in MemberStatus}
    for m in members:
        out[m.status.value] += 1
    return out


def decide(state: CampaignState, wave: int, wave_size: int, allowed_failures: int,
           members: Sequence[Member], now: float) -> Plan:
    """The rules of the module docstring, for one round."""
    if state != CampaignState.running:  # 1
        return Plan(state, wave)
    tally = counts(members)
    if tally[MemberStatus.failed] > allowed_failures:  # 2
        return Plan(CampaignState.halted, wave, why="%d failures, %d allowed"
                    % (tally[MemberStatus.failed], allowed_failures))
    if tally[MemberStatus.done] + tally[MemberStatus.failed] == len(members):  # 3
        return Plan(CampaignState.done, wave, why="every device done or failed")
    plan = Plan(state, wave)
    plan.start = [m.device_id for m in members  # 4
                  if m.status == MemberStatus.retry and (m.next_try_at or 0) <= now]
    current = [m for m in members if m.wave == wave]
    if all(m.status in SETTLED for m in current):  # 5
        nxt = [m.device_id for m in members if m.status == MemberStatus.waiting][:wave_size]
        if nxt:
            plan.wave = wave + 1
            plan.start.extend(nxt)
    return plan


def transition(state: CampaignState, action: str) -> CampaignState:
    """pause, resume or abort (CampaignError 409 when the state refuses it)."""
    if action == "pause" and state == CampaignState.running:
        return CampaignState.paused
    if action == "resume" and state == CampaignState.paused:
        return CampaignState.running
    if action == "abort" and state not in FINAL:
        return CampaignState.aborted
    if action not in ("pause", "resume", "abort"):
        raise ValueError("no campaign action %r" % action)
    raise CampaignError(409, "the campaign is %s: it cannot %s" % (state.value, action))
