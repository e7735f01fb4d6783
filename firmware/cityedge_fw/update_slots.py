"""A/B application slots on the device's flash, the boot pointer, and the boot selector.

Layout under the update directory (``config.json`` ``update.dir``, the flash root)::

    boot.json          the boot pointer (below), replaced whole by ``files.write_atomic``
    slot_a/firmware.romfs, slot_b/firmware.romfs
                       the two application slots: the ROMFS image ``make firmware`` builds
    update.json        the update in progress (``update_agent``), absent otherwise
    update/            its manifest and release-key list while it is checked

The boot pointer is one small JSON map (JSON: the selector runs before any of our CBOR
code is loaded, and MicroPython's ``json`` is built in)::

    {"slot": "a",            the committed slot: the last version known to be healthy
     "seq": 7,               its release sequence (anti-rollback: nothing <= it installs)
     "version": "1.4.0",     its version
     "keys": 3,              the release-key list version taken with it (no list rollback)
     "trial": null | {"slot": "b", "seq": 8, "version": "1.5.0", "keys": 3, "left": 3},
     "last": null | [state, version, seq, reason]}   the last update's outcome

``select`` is the boot selector, run before the application is loaded (a board's frozen
``boot.py``; the unix test harness's first stage, which then maps the chosen slot's image
at ``/rom`` as ``cityedge.romfs`` does). With a trial pending and boots ``left``, it counts
one boot down *on flash first*, then boots the trial slot: a release that crashes or hangs
before it commits uses up its boots and the selector rolls back by itself, reporting
``rolled-back`` with the reason. The running trial release commits (``commit``) once it
is healthy, or rolls back (``roll_back``) when its health deadline passes.

Every change is one ``write_atomic`` of this file: a power cut leaves the old pointer or
the new one, never a mix, and ``installed`` never goes down. No pointer at all is a
factory device: slot ``a``, sequence 0.

Heap: ``json`` plus this module, about 1.5 KB while the selector runs; the running agent
loads it only while it updates.
"""

import json
import os

from .files import write_atomic

POINTER = "boot.json"
UPDATE = "update.json"
IMAGE = "firmware.romfs"
SLOTS = ("a", "b")
# boots a trial release gets to commit itself before the selector rolls back: a healthy
# trial takes 3 (the boot that hands the watch to the agent, the agent's, the boot that
# commits: ``update_check``), so 2 are left for power cuts
TRIAL_BOOTS = 5

COMMITTED = "committed"
ROLLED_BACK = "rolled-back"
FAILED = "failed"


def path(root, name):
    return root.rstrip("/") + "/" + name


def slot_dir(root, slot):
    return path(root, "slot_" + slot)


def image_path(root, slot):
    return slot_dir(root, slot) + "/" + IMAGE


def other(slot):
    return "b" if slot == "a" else "a"


def read_json(file):
    """The JSON map in ``file``, or None when there is none (or it is not a map: a file
    only this firmware writes, atomically; anything else is treated as absent)."""
    try:
        with open(file) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def read_pointer(root):
    p = read_json(path(root, POINTER)) or {}
    if p.get("slot") not in SLOTS:
        p["slot"] = "a"
    for key, default in (("seq", 0), ("version", None), ("keys", 0), ("trial", None),
                         ("last", None)):
        p.setdefault(key, default)
    return p


def write_pointer(root, p):
    write_atomic(path(root, POINTER), json.dumps(p))


def remove(file):
    try:
        os.remove(file)
    except OSError:
        pass


def select(root):
    """The boot selector: the slot to boot now (``"a"`` or ``"b"``), after counting a
    trial boot down or rolling an exhausted trial back (each one pointer write)."""
    p = read_pointer(root)
    t = p["trial"]
    if not t:
        return p["slot"]
    if t.get("left", 0) > 0 and t.get("slot") in SLOTS:
        t["left"] -= 1
        write_pointer(root, p)  # counted before the trial release runs: a crash loop ends
        return t["slot"]
    roll_back(root, p, "the new release did not commit within %d boots" % TRIAL_BOOTS)
    return p["slot"]


def start_trial(root, slot, seq, version, keys):
    """Point the next boot at ``slot`` on trial (the artifact there is verified).
    ``update.json`` (``installing``) stays until the trial ends: its presence is what
    makes the agent load the update's code at all."""
    p = read_pointer(root)
    p["trial"] = {"slot": slot, "seq": seq, "version": version, "keys": keys,
                  "left": TRIAL_BOOTS}
    p["last"] = None
    write_pointer(root, p)


def commit(root, p):
    """The trial release is healthy: it becomes the committed one (and its sequence the
    installed one) in one write."""
    t = p["trial"]
    p["slot"], p["seq"], p["version"], p["keys"] = t["slot"], t["seq"], t["version"], t["keys"]
    p["trial"] = None
    p["last"] = [COMMITTED, t["version"], t["seq"], ""]
    write_pointer(root, p)
    remove(path(root, UPDATE))


def roll_back(root, p, reason):
    """Give the trial up: the committed slot boots from now on; the outcome is kept for
    the status (``last``). The trial slot's image stays until the next update overwrites
    it: the installed sequence did not move, so it can never be booted again.
    ``update.json`` stays, marked ``done``: the next agent reports the outcome and
    removes it."""
    t = p["trial"] or {}
    p["trial"] = None
    p["last"] = [ROLLED_BACK, t.get("version"), t.get("seq"), reason]
    write_pointer(root, p)
    _done(root)


def finish(root, report):
    """End an update that installed nothing (refused or failed): ``report`` kept as the
    last outcome; ``update.json`` marked ``done`` (as ``roll_back``)."""
    p = read_pointer(root)
    p["last"] = report
    write_pointer(root, p)
    _done(root)


def _done(root):
    write_atomic(path(root, UPDATE), '{"state": "done"}')
