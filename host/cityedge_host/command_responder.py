"""Answering fleet commands on CPython: the Raspberry Pi gateway, and any CPython device.

A command from ``ce/v1/<device>/down/cmd`` goes through the core's gate
(``cityedge_core.command_gate.CommandGate``: the same rules the firmware obeys), then the
handler registered for its name runs, and the outcome goes back as a result signed by the
device's own key (``cityedge_core.command.encode_result``), for ``up/result``:

==========================================  ===========================================
what arrives                                 what goes back
==========================================  ===========================================
an accepted command with a handler           ``ok`` (the handler's detail and data), or
                                             ``refused`` (it raised ``Refuse``), or
                                             ``failed`` (any other exception: its text)
an accepted command with no handler          ``refused``: not supported here
a repeat of a seq already taken              the answer kept for it, byte for byte (the
                                             fleet re-sends until it has one: a lost
                                             answer is sent again, never a second one)
a repeat of a seq taken, never answered      ``failed``: the process stopped between
                                             taking and answering it (it may have run)
a repeat of a seq taken, answered later      nothing yet (not run again): its handler
                                             returned ``Later``; ``finish`` answers it
a seq never taken, below one taken later     ``refused``: superseded (the gate takes
                                             seqs in increasing order only)
a repeat of a seq older than all kept        ``failed``: no record of it is kept
expired, or no trusted clock                 ``refused`` with the reason (not taken: the
                                             fleet decides whether to send it again)
another device's, forged, malformed          nothing (counted): only an authentic command
                                             for this device is worth an answer
==========================================  ===========================================

The last ``ANSWERS_KEPT`` seqs taken are kept with their answers in the caller's state
(``get``/``set``, the same object that holds the gate's ``cmd_seq``): a seq is marked
taken before its handler runs and gets its answer after, so a restart still answers a
repeat, and tells a command it was interrupted in from one it never took.

Answered later: a handler whose outcome only a later process can know (an ``update``:
the gateway restarts into the new release, whose trial commits or rolls back) returns
``Later(note)``. The seq is then kept as *taken, answered later* with its name and
``note`` (durably, in the same state): a repeat is neither run again nor answered, and
``pending()`` lists it after a restart, until ``finish(seq, ...)`` signs its answer and
keeps it like any other (a repeat then gets that answer, byte for byte).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cityedge_core import command
from cityedge_core.command_gate import CommandGate, CommandRefused
from cityedge_core.errors import MalformedError, PeerError

ANSWERS_KEPT = 8  # answers kept for repeats; the fleet sends a device's commands in order
ANSWERS_KEY = "cmd_answers"  # state key: [[seq, signed answer or None], ...], oldest first
_TAKEN = None  # the answer of a seq taken and not answered (yet)
_LATER = "later"  # key of a kept entry answered later: {"later": name, "note": note}


class Refuse(Exception):
    """Raised by a handler: the command is understood and declined (``refused``)."""


@dataclass(frozen=True)
class Done:
    """A handler's successful outcome."""

    detail: str = ""
    data: Any = None


@dataclass(frozen=True)
class Later:
    """A handler's outcome that a later process will report (``finish``); ``note``:
    CBOR-able facts kept with the seq for that process (at most a few hundred bytes)."""

    note: Any = None


@dataclass(frozen=True)
class Pending:
    """A command taken and to be answered later (``CommandResponder.pending``)."""

    seq: int
    name: str
    note: Any


Handler = Callable[[Any], Awaitable[Done | Later]]


@dataclass
class ResponderStats:
    accepted: int = 0  # commands the gate took
    answered: int = 0  # results signed (repeats included)
    repeats: int = 0  # seqs taken before, answered again
    refused: int = 0  # authentic commands refused (by the gate or a handler)
    foreign: int = 0  # authentic, for another device
    rejected: int = 0  # forged, unknown key or malformed: not answered
    last_error: str = ""


class CommandResponder:
    def __init__(self, device: str, signer: Any, kid: bytes, fleet_keys: Any,
                 state: Any, handlers: dict[str, Handler],
                 clock: Callable[[], int | None] = lambda: int(time.time())) -> None:
        self.device = device
        self.signer = signer
        self.kid = kid
        self.state = state
        self.handlers = handlers
        self.gate = CommandGate(device, fleet_keys, state, clock)
        self.stats = ResponderStats()

    async def answer(self, data: bytes) -> bytes | None:
        """The signed result to publish for command ``data``, or None (not answered)."""
        try:
            name, seq, args = self.gate.check(data)
        except CommandRefused as e:
            return self._refused(e)
        except (PeerError, MalformedError) as e:
            self.stats.rejected += 1
            self.stats.last_error = str(e)
            return None
        self.stats.accepted += 1
        self._keep(seq, _TAKEN)
        handler = self.handlers.get(name)
        if handler is None:
            self.stats.refused += 1
            refused = self._sign(name, seq, command.REFUSED,
                                 "%s: not supported by this device" % name)
            self._keep(seq, refused)
            return refused
        try:
            done = await handler(args)
            if isinstance(done, Later):
                self._keep(seq, {_LATER: name, "note": done.note})
                return None
            outcome, detail, extra = command.OK, done.detail, done.data
        except Refuse as e:
            self.stats.refused += 1
            outcome, detail, extra = command.REFUSED, str(e), None
        except Exception as e:  # a failing command is reported, never fatal to the device
            outcome, detail, extra = command.FAILED, "%s: %s" % (type(e).__name__, e), None
        try:
            signed = self._sign(name, seq, outcome, detail, extra)
        except ValueError as e:  # data over the result's limit
            signed = self._sign(name, seq, command.FAILED, str(e))
        self._keep(seq, signed)
        return signed

    def _refused(self, e: CommandRefused) -> bytes | None:
        if e.seq is None or e.name is None:  # another device's: not ours to answer
            self.stats.foreign += 1
            self.stats.last_error = str(e)
            return None
        if e.replay:
            self.stats.repeats += 1
            answers = self._answers()
            kept = dict(answers)
            if e.seq in kept:
                answer = kept[e.seq]
                if isinstance(answer, dict):  # answered later: not again, not yet
                    return None
                if answer is not None:
                    self.stats.answered += 1
                    return bytes(answer)
                return self._sign(e.name, e.seq, command.FAILED,
                                  "interrupted: this device stopped after taking the command "
                                  "and before answering it (it may have run)")
            # every seq taken since the oldest kept is kept (save those answered later,
            # which stay beyond that when older)
            settled = [s for s, b in answers if not isinstance(b, dict)] or [
                s for s, _b in answers]
            if settled and e.seq > settled[0]:
                return self._sign(e.name, e.seq, command.REFUSED,
                                  "superseded: a later command was taken first (%s)" % e)
            return self._sign(e.name, e.seq, command.FAILED,
                              "no record of it is kept here any more")
        self.stats.refused += 1
        self.stats.last_error = str(e)
        return self._sign(e.name, e.seq, command.REFUSED, str(e))

    def pending(self) -> list[Pending]:
        """The commands taken and still to be answered (``Later``), oldest first."""
        return [Pending(s, str(b[_LATER]), b.get("note")) for s, b in self._answers()
                if isinstance(b, dict)]

    def finish(self, seq: int, outcome: str, detail: str = "", data: Any = None) -> bytes:
        """Sign the answer of the pending command ``seq`` (``command.OK``/``REFUSED``/
        ``FAILED``), keep it for repeats and return it to publish. ``KeyError`` if ``seq``
        is not pending (a second finish would be a second answer)."""
        mine = [p for p in self.pending() if p.seq == seq]
        if not mine:
            raise KeyError("command %d is not waiting for an answer" % seq)
        try:
            signed = self._sign(mine[0].name, seq, outcome, detail, data)
        except ValueError as e:  # data over the result's limit
            signed = self._sign(mine[0].name, seq, command.FAILED, str(e))
        self._keep(seq, signed)
        return signed

    def _sign(self, name: str, seq: int, outcome: str, detail: str, data: Any = None) -> bytes:
        self.stats.answered += 1
        return command.encode_result(self.signer, self.kid, name, self.device, seq, outcome,
                                     detail, data)

    def _answers(self) -> list[tuple[int, Any]]:
        """``(seq, answer)``: answer None (taken), bytes, or a dict (answered later)."""
        kept = self.state.get(ANSWERS_KEY) or []
        return [(int(s), b if b is None or isinstance(b, dict) else bytes(b))
                for s, b in kept]

    def _keep(self, seq: int, signed: Any) -> None:
        """Keep ``seq``'s entry last; the oldest go beyond ``ANSWERS_KEPT``, those still to
        be answered later only when nothing else is left to drop (their answer is owed)."""
        kept = [[s, b] for s, b in self._answers() if s != seq]
        while len(kept) >= ANSWERS_KEPT:
            drop = next((i for i, (_s, b) in enumerate(kept) if not isinstance(b, dict)), 0)
            del kept[drop]
        self.state.set(**{ANSWERS_KEY: [*kept, [seq, signed]]})
