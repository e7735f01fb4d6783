"""The update's check at boot: the fetched release against the rules, before anything
of the artifact is downloaded (``update.json`` ``checking``; ``main`` runs ``run`` with the
boot's dispatcher, ``update_check``, off the heap, then resets).

Why a boot of its own: ``check_update`` and what it loads (``update_manifest``,
``release_keys``, the CBOR decoder, COSE, P-256 verification) and what it allocates are
the update's heap peak (docs/ARCHITECTURE.md, "Device updates"): it does not fit beside a
streaming agent in a 64 KiB heap, and at boot it has the heap to itself and the boot's
few modules.

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
import sys

from cityedge_core.errors import PeerError

from . import unload, update_slots


def run(cfg):
    """``checking``: the verdict on the release in ``update.dir``'s files; ``update.json``
    then ``downloading``, or the update failed with the reason. A MemoryError fails the
    update (no boot loop)."""
    u = cfg["update"]
    root = u["dir"]
    pend = update_slots.read_json(update_slots.path(root, update_slots.UPDATE))
    pointer = update_slots.read_pointer(root)
    gc.collect()
    heap = [gc.mem_alloc(), 0]  # in use after a collection: at the start, after the verdict
    try:
        _check_release(u, pend, pointer, heap)
    except MemoryError as e:  # the boot's heap: the update fails (no boot loop)
        gc.collect()
        sys.print_exception(e)
        update_slots.finish(root, [update_slots.FAILED, None, None,
                                   "download: no heap at boot for the check"])
    print("update: check heap %d at start, %d after the verdict" % (heap[0], heap[1]))


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

    from cityedge_core import cose_decode  # noqa: F401
    from cityedge_core import update_manifest as um

    # cose_decode is loaded now, before the root set and the key list are read and
    # verified (``cose.decode_sign1`` loads it at the manifest otherwise): its objects
    # then sit below that work's integers, not in a gap they leave (at 64 KiB that
    # import failed for some heap layouts)
    um.update_args({um.A_URL: pend["url"], um.A_MANIFEST_SHA256: unhexlify(pend["digest"])})
    roots, threshold = _root_set(u["root_set"])
    d = update_slots.path(u["dir"], "update/")
    v = um.check_update(_read(d + "manifest"), _read(d + "keys"), roots, threshold,
                        pointer["keys"], "device-firmware", u["hw_class"],
                        pointer["seq"], pointer["version"], pend.get("now"),
                        u.get("flash_budget"))
    return v.reason, v.detail, v.manifest, v.keys.version if v.keys else 0


def _check_release(u, pend, pointer, heap):
    """``checking``: the fetched release against the rules; ``downloading`` or failed.
    ``heap[1]``: in use after a collection once the verdict is reached, the check's
    modules still loaded."""
    root = u["dir"]
    before = set(sys.modules)
    try:
        reason, detail, m, keys = verdict(u, pend, pointer)
    except PeerError as e:  # the command's arguments (``update_args``)
        reason, detail, m, keys = "malformed", str(e), None, 0
    except (OSError, ValueError, KeyError, TypeError) as e:  # our own files: unreadable
        reason, detail, m, keys = "malformed", "update files: %s" % e, None, 0
    gc.collect()
    heap[1] = gc.mem_alloc()
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
