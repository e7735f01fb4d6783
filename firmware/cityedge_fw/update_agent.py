"""The device's update agent: the fleet's signed ``update`` command to a committed (or
rolled-back) release. Loaded only while an update is in progress, by ``Agent``.

States (hawkBit's vocabulary; each one reported in the signed status as ``update``:
``[state, version, sequence, reason]``, kept in the agent's ``State``):

==============  ==========================================================  ==========
state           what happens                                                 where
==============  ==========================================================  ==========
scheduled       the command passed the gate; ``Agent.handle_command`` keeps    agent
                it (``State`` ``update_cmd``) and resets; the next boot
                takes it into ``update.json`` (or answers ``busy``)         ``update_check``
(fetch)         a boot, before the agent is built, fetches the manifest     ``update_boot``
                (at most 2 KiB) and the key list (at most 8 KiB) to
                flash; the manifest's SHA-256 must be the command's; reset
checking        the next boot runs ``check_update``; reset                  ``update_verify``
downloading     ``ok``: the next boot fetches the artifact in Range         ``update_boot``
                requests into the inactive slot, hashed as written;
                nothing past the manifest's size is taken
installing      size and SHA-256 match: the boot pointer names the slot as  ``update_boot``
                a trial (``update_slots.start_trial``), the board resets
trial           the selector boots the new release (a boot counted down);   agent
                it is healthy once connected with its certificate and
                one of its own signed batches acknowledged (PUBACK),
                within ``update.trial_s``: the verdict to flash
                (``trial.verdict``: ``ok`` or the reason), reset
committed       at the next boot: the pointer's committed slot, sequence    ``update_check``
                and version move in one write; an older sequence can
                never install again
rolled-back     the deadline passed (the next boot rolls back, the old one  ``update_check``
                boots) or its boots ran out (the selector rolls back)
failed          refused by a rule, or the download failed: nothing installed ``update_slots``
==============  ==========================================================  ==========

What runs beside the streaming agent is only the trial's health watch and the result's
answer (this module: a few names, all but three interned by the agent anyway); taking the
command, the network stages, the check and the decisions run at boot, where the agent is
not built (``update_check``, ``update_boot``: why, and what happens to readings
meanwhile). The boot hands this module its work in the ``update`` settings: ``trial``
(watch the trial) and ``owed`` (the answers to send: ``[seq, outcome, detail, data]``).
Measured: ``tests/firmware/test_update.py`` (docs/ARCHITECTURE.md, "Device updates").
"""

import asyncio  # MicroPython 1.25+ (ROMFS): no ``uasyncio`` fallback, one name less

from .files import write_atomic

TRIAL_S = 120  # s a trial release has to prove itself healthy (``update.trial_s``)
TRIAL_FILE = "trial.verdict"  # in ``update.dir``: the trial's verdict for the next boot


def run(agent):
    """The agent's one entry, at its start (``Agent.run``, while ``update_cmd`` or
    ``update.json`` is there): the part the boot handed over (``update_check.HANDOFF``,
    removed now: a boot that finds none runs ``update_check`` again), the answers it
    decided, then the trial's watch; a task, or None."""
    import json
    import os

    u = agent.cfg["update"]
    file = u["dir"].rstrip("/") + "/update.agent"
    try:
        with open(file) as f:
            work = json.load(f)
        os.remove(file)
    except (OSError, ValueError):
        return None
    u["owed"] = work.get("owed")
    u["trial"] = work.get("trial")
    if u["owed"] or u["trial"]:
        return asyncio.create_task(_run(agent, u))
    return None


async def _run(agent, u):
    await _answer(agent)
    if u.get("trial"):
        await _watch_trial(agent, u["dir"].rstrip("/") + "/" + TRIAL_FILE,
                           u.get("trial_s", TRIAL_S))


async def _watch_trial(agent, file, trial_s):
    """``trial``: healthy once connected and one own batch acknowledged within
    ``trial_s``; the verdict (``ok`` or the reason) to flash for the next boot, which
    commits or rolls back (``update_check``); then reset."""
    start = agent.link.clock()
    verdict = b"ok"
    while not (agent.link.connects and agent.published):
        if agent.link.clock() - start >= trial_s * 1000:
            reason = "health: no batch acknowledged by the broker within %d s" % trial_s
            if not agent.link.connects:
                reason = "health: broker not reached within %d s (%s)" % (
                    trial_s, agent.link.last_error or "no connection")
            verdict = reason.encode()
            break
        await asyncio.sleep_ms(200)
    write_atomic(file, verdict)
    _reset(agent)


def _reset(agent):
    """Seal what the sampler collected (a reading is never lost to an update's reset),
    then reset the board (the unix port: the process ends, as a board resets)."""
    try:
        agent.seal()
    except Exception as e:  # a reading batch that cannot be signed is not worth a stuck update
        agent.last_error = "update: seal before reset: %s" % e
    reset = getattr(agent.board, "reset", None)
    if reset is not None:
        reset()
    import sys

    print("update: reset")
    sys.exit(0)


# --- the signed result ---------------------------------------------------------------
# The update command is answered once its outcome is decided (``update_check.outcome``):
# ``committed`` -> ``ok``; ``rolled-back`` -> ``failed``; a release the rules refuse ->
# ``refused``; a fetch or download that did not succeed -> ``failed``. The decision is on
# flash (the boot pointer's ``last``) and the seq in ``State`` (``update_cmd``) before
# anything is signed: a power cut between the decision and the publish leaves both, and
# the next boot hands the same answer over again. It is kept with the other answers
# (``answers``), so a resend of the command gets the same bytes again.


async def _wait_connected(agent):
    from .mqtt import CONNECTED

    while agent.link.client.state != CONNECTED:
        await asyncio.sleep_ms(200)


async def _answer(agent):
    """Send the answers the boot decided (``update.owed``) once connected; the update
    command's answered, ``update_cmd`` is cleared."""
    u = agent.cfg["update"]
    owed = u.get("owed") or ()
    if not owed:
        return
    await _wait_connected(agent)
    for seq, kind, detail, data in owed:
        if not await _result(agent, seq, kind, detail, data):
            continue  # no heap to sign it: the next boot hands it over again
        cmd = agent.state.get("update_cmd")
        if cmd and len(cmd) > 2 and cmd[0] is None and cmd[2] == seq:
            agent.state.set(update_cmd=None)
    u["owed"] = None


async def _result(agent, seq, kind, detail, data):
    """The kept answer of ``seq`` again if there is one, else sign, keep and publish;
    a heap too cut up to sign is tried again (the agent goes on streaming). True once
    sent."""
    from . import answers, unload

    try:
        for s, d in answers._kept(agent):
            if s == seq:
                await answers._send(agent, d)
                return True
        for tries in range(5):
            try:
                await answers._signed(agent, "update", seq, kind, detail, data)
                return True
            except MemoryError:
                agent.mem_errors = getattr(agent, "mem_errors", 0) + 1
                await asyncio.sleep_ms(400 * (tries + 1))
        return False
    finally:
        answers = None
        unload("cityedge_fw.answers")
