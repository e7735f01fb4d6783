"""The update's manifest check, run at boot before the agent is built (``main.main``).

Why at boot: ``check_update`` and what it loads (``update_manifest``, ``release_keys``,
the CBOR decoder, COSE, P-256 verification) take about 30 KiB of heap, and the check
allocates 11-26 KiB more (docs/ARCHITECTURE.md, "Release trust (OTA)"): that does not fit
beside a streaming agent in a 64 KiB heap, and fits easily in the heap at boot. So the
running agent only keeps the command (``update.json`` ``scheduled``) and resets; a boot
fetches the manifest and the key list to flash (``update_boot``: bounded sizes, the
manifest's digest checked against the command's) and resets; the next boot's check here
decides, and every module it loaded is unloaded; the download is the boot after
(``update_boot`` again).

What the device trusts, and where it lives:

- the offline **root set** and its threshold: ``root-set.json`` (the release tool's file,
  ``cityedge release root-set``), named by ``config.json`` ``update.root_set``: written at
  provisioning with the rest of the device's trust (the fleet CA, the command keys), on
  the flash root, never by an update;
- its **hardware class** and **flash budget** (the most bytes a slot may take):
  ``update.hw_class``, ``update.flash_budget``;
- the **installed sequence and version** and the **release-key list version** it has
  taken: the boot pointer (``update_slots``), moved only by a commit;
- **now**: the trusted UNIX time at which the agent accepted the ``update`` command (the
  board's clock, which the command gate also used), kept in ``update.json``; without one
  the verdict is ``no_clock`` and nothing installs.

The verdict: ``ok`` makes ``update.json`` ``downloading`` with the manifest's fields (size,
SHA-256, version, sequence, key-list version, the slot to write); anything else ends the
update with ``failed`` and the reason (``update_slots.finish``), reported in the status.
"""

import gc
import json
import os
import sys

from cityedge_core.errors import PeerError

from . import ON_DEMAND, unload, update_slots


def _root_set(file):
    from binascii import unhexlify

    from cityedge_core import cose, p256

    with open(file) as f:
        doc = json.load(f)
    roots = {}
    for r in doc["roots"]:
        point = unhexlify(r["public_key"])
        roots[cose.kid_for_public_key(point)] = p256.PublicKey.from_sec1(point)
    return roots, int(doc["threshold"])


def _read(file):
    with open(file, "rb") as f:
        return f.read()


def verdict(u, pend, pointer):
    """``(reason, manifest or None)`` for the fetched release in ``pend``'s files."""
    from binascii import unhexlify

    from cityedge_core import update_manifest as um

    um.update_args({um.A_URL: pend["url"], um.A_MANIFEST_SHA256: unhexlify(pend["digest"])})
    roots, threshold = _root_set(u["root_set"])
    d = update_slots.path(u["dir"], "update/")
    v = um.check_update(_read(d + "manifest"), _read(d + "keys"), roots, threshold,
                        pointer["keys"], "device-firmware", u["hw_class"],
                        pointer["seq"], pointer["version"], pend.get("now"),
                        u.get("flash_budget"))
    return v.reason, v.detail, v.manifest, v.keys.version if v.keys else 0


def run(cfg):
    """Check a trust-update's statement if one waits (``trust_check.run``), else carry out
    a rotation command kept for the boot, else the update's stage that runs at boot
    (``update.json``: ``scheduled``, ``downloading`` or ``installing`` in ``update_boot``,
    ``checking`` here); True when something ran: ``main`` resets the board after (the
    names interned here would stay on the agent's heap)."""
    try:  # a trust-update's statement first (``trust_check``: the module is named here,
        # not in ``main``, whose names are interned at every boot)
        os.stat(cfg.get("store", {}).get("state", "/state.cbor") + ".trust.new")
    except OSError:
        pass
    else:
        return _trust(cfg)
    try:  # a rotation command the agent kept (``rotation_device``)
        os.stat(cfg.get("store", {}).get("state", "/state.cbor") + ".rotation.new")
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
    st = State(cfg.get("store", {}).get("state", "/state.cbor"))
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
        _report(None, root, cfg.get("store", {}).get("state", "/state.cbor"))
        return True
    elif state == "checking":
        st = None  # the state's decoder off the heap first: the check's peak is high
        unload("cityedge_fw.store", *ON_DEMAND)
        gc.collect()
        try:
            _check_release(u, pend, pointer)
        except MemoryError:  # the boot's heap: the update fails (no boot loop)
            gc.collect()
            update_slots.finish(root, [update_slots.FAILED, None, None,
                                       "download: no heap at boot for the check"])
        _report(None, root, cfg.get("store", {}).get("state", "/state.cbor"))
        return True
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


def _report(st, root, state_path=None):
    """The update's state for the agent's signed status (``State`` ``update``:
    ``[state, version, sequence, reason]``), from the files; ``st`` None: the state file
    is read now (a heap too cut up for that: the next boot's step reports)."""
    if st is None:
        from .store import State

        try:
            st = State(state_path)
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


def _check_release(u, pend, pointer):
    """``checking``: the fetched release against the rules; ``downloading`` or failed."""
    root = u["dir"]
    before = set(sys.modules)
    try:
        reason, detail, m, keys = verdict(u, pend, pointer)
    except PeerError as e:  # the command's arguments (``update_args``)
        reason, detail, m, keys = "malformed", str(e), None, 0
    except (OSError, ValueError, KeyError, TypeError) as e:  # our own files: unreadable
        reason, detail, m, keys = "malformed", "update files: %s" % e, None, 0
    for name in set(sys.modules) - before:
        unload(name)
    gc.collect()
    if reason != "ok":
        update_slots.finish(root, [update_slots.FAILED, m.version if m else None,
                                   m.sequence if m else None, "%s: %s" % (reason, detail)])
        print("update: refused: %s: %s" % (reason, detail))
        return True
    slot = update_slots.other(pointer["slot"])
    pend.update(state="downloading", version=m.version, seq=m.sequence, size=m.size,
                sha256="".join("%02x" % b for b in m.sha256), keys=keys, slot=slot)
    from .files import write_atomic

    update_slots.remove(update_slots.image_path(root, slot))  # an older image, or a torn one
    write_atomic(update_slots.path(root, update_slots.UPDATE), json.dumps(pend))
    print("update: %s %s (sequence %d) accepted; downloading into slot %s"
          % (m.component, m.version, m.sequence, slot))
    return True


# --- a trust-update's statement (``trust_check``) ---------------------------------

class _Signer:
    """What ``answers`` needs of an agent to sign and keep a result (no link: nothing is
    published here; the agent publishes it once connected, ``answers.publish_unsent``)."""

    def __init__(self, device, key, kid, state_path):
        self.device = device
        self.writer = self  # ``writer.signer``, ``writer.kid``
        self.signer = key
        self.kid = kid
        self.state = self  # ``state.path``
        self.path = state_path


def _key(tls):
    """The device's current key (``key_slots``' pointer: the slot's suffix)."""
    from .keys import private_key_from_der, read_file

    try:
        with open(tls["key"] + ".slot") as f:
            sfx = f.read()
    except OSError:
        sfx = ""
    return private_key_from_der(read_file(tls["key"] + sfx))


_OUTCOMES = ("ok", "refused", "failed")


def _trust(cfg):
    """Check the statement that waits (``S.trust.new``), install it if it holds, keep the
    signed answer (``trust_check``'s rules); True (``main`` then resets: the names the
    check interned would stay on the agent's heap).

    The check and the answer's signature may not fit in one boot's heap (the check leaves
    it cut up): then the verdict replaces the statement in ``S.trust.new`` (``0``, the
    header, the outcome's index, the detail) and the next boot, with nothing else loaded,
    signs and keeps the answer. A boot that cannot sign even that drops it (no boot loop:
    the fleet's resend is then refused as a replay). The answer kept is also kept for the
agent to publish once connected (``answers.keep_unsent``): the fleet has it without
sending the command again."""
    state = cfg.get("store", {}).get("state", "/state.cbor")
    pending = state + ".trust.new"
    got = _pending(pending)
    if got is None:
        return True
    owed, head, device, seq, now, data = got
    if owed:
        outcome, detail = _OUTCOMES[min(data[0], 2)], data[1:].decode()
    else:
        outcome, detail = _check(cfg, state, seq, data, now)
    data = None
    try:
        from cityedge_core import cose

        key = _key(cfg["tls"])
        agent = _Signer(device, key, cose.kid_for_public_key(key.public_key().to_sec1()),
                        state)
        _sign(agent, "trust-update", seq, outcome, detail)
    except MemoryError:
        agent = key = None
        gc.collect()
        if not owed:  # the verdict waits for the next boot's clean heap
            from .files import write_atomic

            write_atomic(pending, (b"\x00", head, bytes([_OUTCOMES.index(outcome)]),
                                   detail.encode()))
            print("trust-update %d: the answer is signed at the next boot (heap)" % seq)
            return True
        print("trust-update %d: no heap to sign the answer: dropped" % seq)
    else:
        if owed:
            print("trust-update %d: answer kept" % seq)
    os.remove(pending)
    return True


def _pending(pending):
    """``(owed, head, device, seq, now, data)`` of a command kept for the boot
    (``answers._for_boot``: ``[len, device, seq 8, now 8, data]``; ``owed``: a verdict an
    earlier boot could not sign, ``0`` before it), or None after removing a file that is
    not one (torn cannot be: an atomic write)."""
    with open(pending, "rb") as f:
        raw = f.read()
    owed = raw[:1] == b"\x00"
    if owed:
        raw = raw[1:]
    n = raw[0] if raw else 0
    if not n or len(raw) < 17 + n + (1 if owed else 0):
        os.remove(pending)
        return None
    return (owed, bytes(raw[:17 + n]), bytes(raw[1:1 + n]).decode(),
            int.from_bytes(raw[1 + n:9 + n], "big"),
            int.from_bytes(raw[9 + n:17 + n], "big") or None, bytes(raw[17 + n:]))


def _sign(agent, name, seq, outcome, detail, csr=None):
    """Sign and keep the answer to ``seq`` (``answers``: with the last answers, for the
    fleet's resend), then keep it, after the CSR ``csr`` if there is one, for the agent
    to publish once connected."""
    from . import answers

    data = answers._encode(agent, name, seq, outcome, detail)
    answers._keep(agent, seq, data)  # (an OSError there: not kept, published all the same)
    parts = [(1, csr), (0, data)] if csr else [(0, data)]
    data = None
    try:
        answers.keep_unsent(agent.path, parts)
    except OSError as e:  # the answer is kept: the fleet's resend gets it
        print("%s %d: not kept to publish: %s" % (name, seq, e))


def _check(cfg, state, seq, data, now):
    """``(outcome, detail)`` of statement ``data`` (installed if it holds)."""
    from .trust_check import install_checked

    outcome = "ok"
    try:
        if not data:  # the agent keeps none that cannot be one (``answers``)
            raise PeerError("trust-update: the statement (1) must be 1..1024 bytes")
        with open(cfg["tls"]["ca"], "rb") as f:
            root = f.read()
        v = install_checked(state + ".trust", root, data, now)
        detail = ("trust statement v%d installed" % v) if v else \
            "trust statement already installed"
    except PeerError as e:
        outcome, detail = "refused", str(e)
    except (OSError, ValueError, KeyError) as e:
        outcome, detail = "failed", "trust store: %s" % e
    print("trust-update %d: %s: %s" % (seq, outcome, detail))
    # the checker and the statement's decoder off the heap before the answer is signed
    install_checked = data = root = None
    unload("cityedge_fw.trust_check", "cityedge_core.trust_statement")
    gc.collect()
    return outcome, detail
