"""OTA campaigns and release delivery: the policy, I/O-free (``ota_store`` reads and writes
the database and the artifact store, ``api/ota_routes`` serves it, ``campaign_runner``
runs it in ``fleet serve``); tested as tables and a hypothesis state machine in
``tests/fleet/test_fleet_ota_policy.py``. Selectors, campaign states, pause/resume/abort
and ``--max-failures`` are the rotation campaigns' (``campaign``).

**Waves** (``parse_waves``): ``1%,10%,100%`` are cumulative shares of the members (each
rounded up, so ``1%`` of 50 devices is 1), or counts (``5,50,100%``); they rise and the
last is ``100%`` (or every member). Waves that would add nobody are merged.

**A member's status** (``member_status``), from its ``update`` command and what the
device fetched (the fleet serves the release's files, so it sees the download):

==============  ============================================================================
 status         when
==============  ============================================================================
 waiting        in no wave yet
 pending        its ``update`` command is queued, not tried yet
 offline        tried, the broker had no subscription of the device (it is sent again when
                the device is back: an offline member gets the update when it returns)
 sent           delivered, nothing fetched yet
 downloading    the device fetched the release's manifest or part of its artifact
 downloaded     the device fetched the artifact's last byte (it installs, then its trial)
 committed      its signed result ``ok`` (the release passed its trial and is committed)
 rolled-back    its signed result ``failed`` with ``{"state": "rolled-back"}``
 failed         its signed result ``failed`` or ``refused`` (the manifest refused: the
                reason code of ``check_update``), or delivered but unanswered when the
                command expired
 missed         the command expired or was cancelled (abort) before it reached the device
==============  ============================================================================

``rolled-back`` and ``failed`` are failures; ``missed`` is neither a failure nor a success.

**The campaign's rules** (``decide``), in order; the first that applies decides:

====  =====================================================================================
 #    rule
====  =====================================================================================
 1    a campaign that is not ``running`` starts nothing
 2    more failures than it allows (``allowed_failures``) halt it: ``halted``
 3    every member finished (committed, rolled-back, failed, missed): ``done``
 4    no wave yet, or the current wave's success threshold is met (``committed`` members
      of the wave at least ``success`` of its members, rounded up): the next wave starts,
      the members up to the next cumulative count in member order
====  =====================================================================================

So a wave waits for its devices to commit, not merely to answer: an offline device holds
its wave only if the threshold needs it (``--success 100%``).

**One device, one vote.** ``decide`` counts members, and a campaign has one member per
device (the member table's key); a member's status comes from its own ``update`` command
only, whose result the ingest takes once: signed by the device's active key, naming that
device, on its own topic, for a seq the fleet sent it — and the first result is kept (a
repeat is a duplicate, a contradiction a conflict: neither changes it). So a device, also
a stolen one with its valid key, can advance a wave by its own commit and halt a campaign
by its own failure, never by more; it cannot vote for a device not in the wave, nor twice.
What it can do is lie about its own outcome (commit without having updated): in a small
wave that one vote may be the whole threshold (``1,100%``: the first device decides the
second wave). Size the first wave so that the threshold needs several devices, and
watch their signed status (the installed version) before widening.

**Range requests** (``parse_range``): one range of ``bytes=`` (``a-b``, ``a-``, ``-n``),
numbers of at most ``RANGE_DIGITS_MAX`` digits; several ranges, a start past the end, an
end before the start, or anything else is ``RangeRefused`` (416). An end past the artifact
is cut to its last byte (RFC 9110). So one request costs at most one pass over the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cityedge_fleet.campaign import CampaignError, CampaignState


@dataclass(frozen=True)
class OtaLimits:
    """Limits of releases and OTA campaigns, each with its unit."""

    waves_max: int = 16  # waves of one campaign
    waves_max_chars: int = 128  # characters of a --waves text
    token_bytes: int = 16  # random bytes of a member's download capability
    chunk_bytes: int = 64 * 1024  # bytes read from the store per chunk served


LIMITS = OtaLimits()
RANGE_DIGITS_MAX = 15  # digits of a number in a Range header


class MemberStatus(StrEnum):
    waiting = "waiting"
    pending = "pending"
    offline = "offline"
    sent = "sent"
    downloading = "downloading"
    downloaded = "downloaded"
    committed = "committed"
    rolled_back = "rolled-back"
    failed = "failed"
    missed = "missed"


M = MemberStatus
FAILURES = (M.rolled_back, M.failed)
FINISHED = (M.committed, M.rolled_back, M.failed, M.missed)
PROGRESS = (M.downloading, M.downloaded)  # recorded by the download endpoint


# ----------------------------------------------------------------------------- waves


def parse_waves(text: str, members: int, lim: OtaLimits = LIMITS) -> list[int]:
    """``1%,10%,100%`` -> cumulative member counts (module docstring); CampaignError 422."""
    if len(text) > lim.waves_max_chars:
        raise CampaignError(422, "waves: at most %d characters" % lim.waves_max_chars)
    parts = [p.strip() for p in text.split(",")]
    if not parts or len(parts) > lim.waves_max:
        raise CampaignError(422, "waves: 1 to %d, e.g. 1%%,10%%,100%%" % lim.waves_max)
    out: list[int] = []
    for p in parts:
        m = re.fullmatch(r"([0-9]{1,9})(\.[0-9]{1,3})?(%?)", p)
        if m is None or (m.group(2) and not m.group(3)):
            raise CampaignError(422, "waves: %r is not a share (e.g. 10%%) or a count (e.g. "
                                "50)" % p[:20])
        if m.group(3):
            pct = float(m.group(1) + (m.group(2) or ""))
            if not 0 < pct <= 100:
                raise CampaignError(422, "waves: %r: a share is above 0%% and at most 100%%"
                                    % p)
            n = math.ceil(members * pct / 100)
        else:
            n = int(m.group(1))
            if n < 1:
                raise CampaignError(422, "waves: a count is at least 1")
        if out and n < out[-1]:
            raise CampaignError(422, "waves: %r is below the wave before it: the waves are "
                                "cumulative and rise (e.g. 1%%,10%%,100%%)" % p)
        out.append(min(n, members))
    if out[-1] != members:
        raise CampaignError(422, "waves: the last wave must take every device (100%%); it "
                            "takes %d of %d" % (out[-1], members))
    return sorted(set(out))  # waves adding nobody merged


def parse_success(text: str) -> float:
    """``90%`` -> 90.0: the share of a wave that must commit before the next starts."""
    m = re.fullmatch(r"([0-9]{1,3})(\.[0-9]{1,3})?%", text.strip())
    pct = float(m.group(1) + (m.group(2) or "")) if m else -1.0
    if not 0 <= pct <= 100:
        raise CampaignError(422, "success %r: a percentage from 0%% to 100%% (e.g. 90%%)"
                            % text[:20])
    return pct


def needed(wave_members: int, success_pct: float) -> int:
    """Members of a wave that must commit for the next wave to start (rounded up)."""
    return math.ceil(wave_members * success_pct / 100 - 1e-9)


# ------------------------------------------------------------------------ members


@dataclass(frozen=True)
class CommandFacts:
    """What ``member_status`` reads of a member's ``update`` command."""

    state: str  # ``models.CommandState``: queued, sent, ok, refused, failed, expired, ...
    sends: int = 0  # deliveries (the broker had the device's subscription)
    attempts: int = 0  # tries (PUBACK received, delivered or not)
    detail: str = ""  # the device's result detail
    result_state: str = ""  # ``state`` in the device's result data ("rolled-back", ...)


def member_status(cmd: CommandFacts | None, progress: str = "") -> tuple[MemberStatus, str]:
    """A started member's status and reason (module docstring); ``progress``: what the
    download endpoint recorded ("", downloading, downloaded)."""
    if cmd is None:
        return M.waiting, ""
    st = cmd.state
    if st == "ok":
        return M.committed, ""
    if st == "refused":
        return M.failed, "refused: %s" % (cmd.detail or "no reason given")
    if st == "failed":
        if cmd.result_state == "rolled-back":
            return M.rolled_back, "rolled back: %s" % (cmd.detail or "no reason given")
        return M.failed, "failed: %s" % (cmd.detail or "no reason given")
    if st in ("expired", "cancelled"):
        if cmd.sends == 0 and not progress:
            return M.missed, "the update command %s before it reached the device" % st
        return M.failed, "no answer before the update command %s" % (
            "expired" if st == "expired" else "was cancelled")
    if progress in (M.downloading, M.downloaded):
        return M(progress), ""
    if cmd.sends > 0:
        return M.sent, ""
    if cmd.attempts > 0:
        return M.offline, ""
    return M.pending, ""


# ------------------------------------------------------------------------- campaign


@dataclass(frozen=True)
class Member:
    device_id: str
    status: MemberStatus = M.waiting
    wave: int | None = None


@dataclass
class Plan:
    state: CampaignState
    wave: int
    start: list[str] = field(default_factory=list)
    why: str = ""


def counts(members: Iterable[Member]) -> dict[str, int]:
    out = {s.value: 0 for s in MemberStatus}
    for m in members:
        out[m.status.value] += 1
    return out


def wave_gate(wave: int, success_pct: float, members: Sequence[Member]) -> tuple[int, int]:
    """(committed, needed) of wave ``wave``."""
    current = [m for m in members if m.wave == wave]
    return (sum(1 for m in current if m.status == M.committed),
            needed(len(current), success_pct))


def decide(state: CampaignState, wave: int, waves: Sequence[int], success_pct: float,
           allowed_failures: int, members: Sequence[Member]) -> Plan:
    """The rules of the module docstring, for one round. ``waves``: cumulative counts."""
    if state != CampaignState.running:  # 1
        return Plan(state, wave)
    tally = counts(members)
    failures = sum(tally[s.value] for s in FAILURES)
    if failures > allowed_failures:  # 2
        return Plan(CampaignState.halted, wave, why="%d failures (rolled back or failed), "
                    "%d allowed" % (failures, allowed_failures))
    if sum(tally[s.value] for s in FINISHED) == len(members):  # 3
        return Plan(CampaignState.done, wave, why="every device finished")
    if wave >= len(waves):
        return Plan(state, wave)  # the last wave is under way
    if wave > 0:
        got, need = wave_gate(wave, success_pct, members)
        if got < need:
            return Plan(state, wave)
    started = sum(1 for m in members if m.wave is not None)
    take = waves[wave] - started
    nxt = [m.device_id for m in members if m.status == M.waiting][:max(0, take)]
    return Plan(state, wave + 1, nxt)


# ---------------------------------------------------------------------------- ranges


class RangeRefused(ValueError):
    """A Range header the artifact endpoint does not serve (416)."""


_RANGE = re.compile(r"bytes=([0-9]{0,%d})-([0-9]{0,%d})" % (RANGE_DIGITS_MAX,
                                                            RANGE_DIGITS_MAX))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of one range of a ``size``-byte file, None for the whole
    file (no header); ``RangeRefused`` otherwise (module docstring)."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        raise RangeRefused("one byte range, bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX")
    a, b = m.group(1), m.group(2)
    if not a and not b:
        raise RangeRefused("an empty range")
    if not a:  # the last b bytes
        n = int(b)
        if n == 0:
            raise RangeRefused("a suffix of zero bytes")
        return max(0, size - n), size - 1
    first = int(a)
    last = int(b) if b else size - 1
    if first >= size:
        raise RangeRefused("the range starts at %d, the file has %d bytes" % (first, size))
    if last < first:
        raise RangeRefused("the range ends before it starts")
    return first, min(last, size - 1)
