"""The boot's dispatcher (``main.main``): a command kept for the boot (a trust-update's
statement, ``boot_answer``; a rotation, ``rotation_device``), else the update's step due
at this boot, before the agent is built.

Why at boot: an update's stages (the manifest's check, the download) do not fit beside a
streaming agent in a 64 KiB heap (docs/ARCHITECTURE.md, "Device updates"). So the running
agent only keeps the command (``update.json`` ``scheduled``) and resets; a boot fetches the
manifest and the key list to flash (``update_boot``: bounded sizes, the manifest's digest
checked against the command's) and resets; the next boot checks them (``update_verify``,
which ``main`` runs once this module is off the heap: the check is the update's heap
peak) and resets; the download is the boot after (``update_boot`` again).
"""

import gc
import json
import os

from . import ON_DEMAND, state_path, unload, update_slots


def run(cfg):
    """Check a trust-update's statement if one waits (``trust_check.run``), else carry out
    a rotation command kept for the boot, else the update's stage that runs at boot
    (``update.json``: ``scheduled``, ``downloading`` or ``installing`` in ``update_boot``,
    ``checking`` in ``update_verify``); True when something ran, ``CHECK`` when the
    release's check is due: ``main`` resets the board after (the names interned here
    would stay on the agent's heap)."""
    try:  # a trust-update's statement first (``trust_check``: the module is named here,
        # not in ``main``, whose names are interned at every boot)
        os.stat(state_path(cfg) + ".trust.new")
    except OSError:
        pass
    else:  # (its own module: the update's boot steps do not carry it)
        from . import boot_answer

        return boot_answer.run(cfg)
    try:  # a rotation command the agent kept (``rotation_device``)
        os.stat(state_path(cfg) + ".rotation.new")
    except OSError:
        pass
    else:  # (the rotation's boot step lives with it: this module stays small for the
        # update's check, whose boot heap is tight)
        from . import rotation_device

        return rotation_device.boot_step(cfg)
    u = cfg.get("update")
    if not u:
        return False
    return _update(cfg, u)


CHECK = 2  # ``run``: the release's check is due (``main`` runs ``update_verify``)
HANDOFF = "update.agent"  # in ``update.dir``: the agent's part of the update (``_update``)


def _update(cfg, u):
    """The update's step due at this boot (module doc), from the files: the command the
    agent kept (``State`` ``update_cmd``), ``update.json``, the pointer and the trial's
    verdict. True when a step ran (``main`` resets). What only the running agent can do
    (watch a trial, publish the answers decided here) is handed over in ``HANDOFF``
    (``{"trial": 0 or 1, "owed": [[seq, outcome, detail, data]...]}``) and the board
    resets too: the agent is never built in a boot that loaded this module (its names
    and objects would stay on the agent's heap); ``main`` boots the agent while the file
    is there, and ``update_agent`` removes it as it starts."""
    from .store import State

    root = u["dir"]
    st = State(state_path(cfg))
    cmd = st.get("update_cmd")
    seq = cmd[2] if cmd and len(cmd) > 2 else None
    upath = update_slots.path(root, update_slots.UPDATE)
    pend = update_slots.read_json(upath)
    state = pend.get("state") if pend else None
    pointer = update_slots.read_pointer(root)
    verdict = update_slots.path(root, "trial.verdict")
    owed = []
    if cmd and cmd[0] is not None:  # a command the agent kept: taken now
        if state in (None, "done"):
            _accept(root, cmd[0], cmd[1], seq)
        elif pend.get("cmd") != seq:  # another update runs: this one is refused
            owed.append([seq, "refused", "busy: update sequence %s is %s"
                         % (pend.get("seq"), state), None])
            seq = pend.get("cmd")  # the one still to be answered
        # (else: taken before a power cut, the state not moved on yet)
        st.set(update_cmd=[None, None, seq])
        if not owed:
            _report(st, root)
            return True
        # busy: the update in progress goes on below (its trial, most likely: the agent
        # built at this boot sends the refusal; a boot stage resets first, and the fleet's
        # resend is then refused as a replay)
    if state in ("scheduled", "downloading") or (
            state == "installing" and not pointer["trial"] and
            pend.get("seq", 0) > pointer["seq"]):  # (a cut before the trial was set)
        st = None  # the state's decoder off the heap first
        unload("cityedge_fw.store", *ON_DEMAND)
        gc.collect()
        from . import update_boot  # the network stages, in this boot's heap

        update_boot.run(cfg, pend)
        update_boot = pend = None
        unload("cityedge_fw.update_boot", "cityedge_fw.update_http")
        gc.collect()
        _report(None, root, state_path(cfg))
        return True
    elif state == "checking":  # the release's check (``update_verify``): ``main`` runs
        # it with this module and the state's decoder off the heap, the check's peak being
        # the update's; the next boot's step reports the outcome (``_report``)
        return CHECK
    elif pointer["trial"]:
        try:
            with open(verdict, "rb") as f:
                said = f.read()
        except OSError:  # none yet: the trial's agent watches it
            said = None
        if said is not None:  # the trial's agent decided: commit or roll back
            if said == b"ok":
                update_slots.commit(root, pointer)
            else:
                update_slots.roll_back(root, pointer, said.decode())
            update_slots.remove(verdict)
            _report(st, root)
            return True
        t = pointer["trial"]
        st.set(update=["trial", t["version"], t["seq"], ""])
    elif pend is not None:  # over (``done``, or a commit cut short): the answer below
        update_slots.remove(upath)
    if seq is not None and not pointer["trial"] and state not in (
            "scheduled", "checking", "downloading", "installing"):
        last = pointer["last"] or [update_slots.FAILED, None, None, "no outcome recorded"]
        owed.append([seq] + list(outcome(last)))
        st.set(update=last)
    if not (owed or pointer["trial"] or pend):
        return False
    if owed or pointer["trial"]:  # the agent's part, for the next boot's agent
        from .files import write_atomic

        write_atomic(update_slots.path(root, HANDOFF), json.dumps(
            {"trial": 1 if pointer["trial"] else 0, "owed": owed}).encode())
    return True


def _report(st, root, path=None):
    """The update's state for the agent's signed status (``State`` ``update``:
    ``[state, version, sequence, reason]``), from the files; ``st`` None: the state file
    is read now (a heap too cut up for that: the next boot's step reports)."""
    if st is None:
        from .store import State

        try:
            st = State(path)
        except MemoryError:
            return
    p = update_slots.read_pointer(root)
    pend = update_slots.read_json(update_slots.path(root, update_slots.UPDATE)) or {}
    state = pend.get("state")
    if p["trial"]:
        rep = ["trial", p["trial"]["version"], p["trial"]["seq"], ""]
    elif state and state != "done":
        rep = [state, pend.get("version"), pend.get("seq"), ""]
    else:
        rep = p["last"]
    if rep and st.get("update") != rep:
        st.set(update=rep)


def _accept(root, args, now, cmd):
    """A signed ``update`` command (``now``: the trusted time the gate took it at; ``cmd``:
    its seq) into ``update.json`` (``scheduled``: the next boot fetches the release).
    Its arguments are checked in full by the check (``update_manifest.update_args``);
    here what keeping them needs."""
    url = args.get(1) if isinstance(args, dict) else None
    digest = args.get(2) if isinstance(args, dict) else None
    if not isinstance(url, str) or not url.startswith("https://") or len(url) > 256 or \
            not isinstance(digest, bytes) or len(digest) != 32:
        update_slots.finish(root, [update_slots.FAILED, None, None,
                                   "malformed: update arguments"])
        return
    from .files import write_atomic

    write_atomic(update_slots.path(root, update_slots.UPDATE), json.dumps(
        {"state": "scheduled", "url": url, "digest": "".join("%02x" % b for b in digest),
         "now": now, "cmd": cmd}))


_FAILURES = ("fetch", "download", "artifact_digest", "artifact_too_long")


def outcome(last):
    """``(outcome, detail, data)`` of the result for the pointer's ``last`` outcome:
    ``committed`` -> ``ok``; ``rolled-back`` -> ``failed``; a fetch or download that did
    not succeed -> ``failed``; a release the rules refuse (a ``check_update`` reason code,
    ``manifest_digest``, malformed arguments) -> ``refused`` (what the fleet's
    ``ota.member_status`` reads)."""
    state, version, seq, reason = (list(last) + [None, None, None, ""])[:4]
    data = {"state": state, "version": version, "sequence": seq}
    if state == update_slots.COMMITTED:
        return "ok", "committed %s (sequence %s)" % (version, seq), data
    if state == update_slots.ROLLED_BACK:
        return "failed", reason or "rolled back", data
    reason = reason or "failed"
    for prefix in _FAILURES:
        if reason.startswith(prefix):
            return "failed", reason, data
    return "refused", reason, data
