"""The serial console rule: what a board answered on its UART in, one verdict out.

Sans-IO: ``check_transcript(steps)`` reads nothing but its argument (``serial_probe`` opens
the port, sends the probe bytes and records what came back). A ``ProbeStep`` is one thing
the probe sent and the bytes that came back before the next one. The rule decides
CE-DBG-03 ("production firmware offers no interactive console"), first match wins:

1. ``fail`` when any answer holds a MicroPython console marker (``REPL_MARKERS``: the
   ``>>> `` prompt, the raw REPL's ``raw REPL; CTRL-B to exit``, the ``MicroPython v``
   banner, ``Type "help()"``): whoever holds the cable can run code on the board.
2. ``could not decide`` when nothing came back at all: a silent port may be the wrong port,
   a board that is off, or a console on another baud rate.
3. ``could not decide`` when an answer holds bytes outside cityedge frames
   (``cityedge_core.frame``: garbage, a corrupted frame): unknown text may be another
   console (a serial login) this rule does not know.
4. ``pass`` when every byte that came back is a well-formed cityedge frame and one of them
   is the reply to the probe's ``hello`` (a locked device answers ``hello`` and refuses the
   rest; its error frames for the console bytes are frames too). The device's provisioning
   state is reported; a device that is not ``locked`` still has no console, but the note
   says it has not finished provisioning.
5. ``could not decide`` otherwise (frames but no ``hello`` reply).

The evidence is the bytes that decided, escaped (``\\xNN``) and cut to
``serial_evidence_max_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cityedge_core import frame
from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

REQ_NO_CONSOLE = "CE-DBG-03"
CHECK = "serial-console"

REPL_MARKERS = (b">>> ", b"raw REPL; CTRL-B to exit", b"MicroPython v", b'Type "help()"')

_FIX_CONSOLE = ("build the production image without the REPL on the UART (the cityedge "
                "firmware's board_boot serves only the framed provisioning protocol), "
                "flash it and run the probe again")
_FIX_UNDECIDED = ("check the port and the cable (`cityedge provision ports`), that the board "
                  "runs and is not held by another program, then run the probe again")


@dataclass(frozen=True)
class ProbeStep:
    """One probe step: its name, the bytes sent and the bytes that came back."""

    name: str
    sent: bytes
    received: bytes


def escape(data: bytes, limits: HardwareLimits = LIMITS) -> str:
    """``data`` as printable text (``\\xNN`` for other bytes), cut to the evidence limit."""
    cut = data[:limits.serial_evidence_max_bytes]
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else "\\x%02x" % b for b in cut)
    if len(data) > len(cut):
        text += "... (%d bytes)" % len(data)
    return text


def _find_marker(steps: Sequence[ProbeStep]) -> tuple[ProbeStep, bytes, int] | None:
    for step in steps:
        for marker in REPL_MARKERS:
            i = step.received.find(marker)
            if i >= 0:
                return step, marker, i
    return None


def _decode(data: bytes) -> tuple[list[dict[Any, Any]], list[frame.FrameError], int]:
    """Messages, faults and the bytes left pending in ``data`` (a frame cut short)."""
    dec = frame.FrameDecoder()
    msgs: list[dict[Any, Any]] = []
    faults: list[frame.FrameError] = []
    for item in dec.feed(data):
        if isinstance(item, frame.FrameError):
            faults.append(item)
        else:
            msgs.append(item)
    return msgs, faults, dec.pending()


def check_transcript(steps: Sequence[ProbeStep],
                     limits: HardwareLimits = LIMITS) -> Verdict:
    """The CE-DBG-03 verdict for one probe run (rules in the module docstring)."""
    found = _find_marker(steps)
    if found is not None:
        step, marker, i = found
        start = max(0, i - limits.serial_evidence_max_bytes // 2)
        return Verdict(REQ_NO_CONSOLE, CHECK, Outcome.FAIL,
                       "the board answered %r with a MicroPython console (%s)"
                       % (step.name, marker.decode()),
                       (Evidence("answer to " + step.name,
                                 escape(step.received[start:], limits)),),
                       fix=_FIX_CONSOLE)
    received = b"".join(s.received for s in steps)
    if not received:
        return Verdict(REQ_NO_CONSOLE, CHECK, Outcome.UNDECIDED,
                       "the port stayed silent: no console and no cityedge frame answered",
                       (Evidence("answer", "", "%d probe steps, no byte back" % len(steps)),),
                       fix=_FIX_UNDECIDED)
    msgs, faults, pending = _decode(received)
    if faults or pending:
        what = (", ".join(repr(f) for f in faults[:3]) if faults
                else "%d bytes of a frame cut short" % pending)
        return Verdict(REQ_NO_CONSOLE, CHECK, Outcome.UNDECIDED,
                       "the board answered bytes that are neither a console prompt nor "
                       "cityedge frames (%s)" % what,
                       (Evidence("answer", escape(received, limits),
                                 "%d bytes in all" % len(received)),),
                       fix=_FIX_UNDECIDED)
    hellos = [m for m in msgs if m.get(frame.F_TYPE) == frame.T_HELLO]
    if not hellos:
        return Verdict(REQ_NO_CONSOLE, CHECK, Outcome.UNDECIDED,
                       "the board answered %d cityedge frames but none replies to hello"
                       % len(msgs),
                       (Evidence("answer", escape(received, limits)),), fix=_FIX_UNDECIDED)
    hello = hellos[0]
    state = hello.get(frame.F_STATE)
    refused = sum(1 for m in msgs if m.get(frame.F_TYPE) == frame.T_ERROR)
    note = "locked" if state == "locked" else "not locked: provisioning is not finished"
    return Verdict(REQ_NO_CONSOLE, CHECK, Outcome.PASS,
                   "the board answered only cityedge frames: the hello reply and %d "
                   "refusals, no console prompt" % refused,
                   (Evidence("hello.state", str(state), note),
                    Evidence("hello.firmware", str(hello.get(frame.F_FIRMWARE))),
                    Evidence("frames", str(len(msgs)), "%d bytes, all framed"
                             % len(received))))
