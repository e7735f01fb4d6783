"""The update's manifest check, run at boot before the agent is built (``main.main``).

Why at boot: ``check_update`` and what it loads (``update_manifest``, ``release_keys``,
the CBOR decoder, COSE, P-256 verification) take about 30 KiB of heap, and the check
allocates 11-26 KiB more (docs/ARCHITECTURE.md, "Release trust (OTA)"): that does not fit
beside a streaming agent in a 64 KiB heap, and fits easily in the heap at boot. So the
running agent only fetches the manifest and the key list to flash (bounded sizes, the
manifest's digest checked against the command's) and reboots; this module then decides,
and every module it loaded is unloaded before the agent is built.

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

from . import unload, update_slots


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
    """Check a trust-update's statement if one waits (``trust_check.run``), else the
    fetched release if one waits (``update.json`` state ``checking``);
    ``main`` resets the board after (the names the check interned would stay on the
    agent's heap)."""
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
    root = u["dir"]
    pend = update_slots.read_json(update_slots.path(root, update_slots.UPDATE))
    if not pend or pend.get("state") != "checking":
        return False
    before = set(sys.modules)
    pointer = update_slots.read_pointer(root)
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
