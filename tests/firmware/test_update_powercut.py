"""Power cuts at every flash write of the device's download and install path, on the real
MicroPython unix port with LittleFS over ``simbus.CutFlash`` (as ``test_store_powercut``).

This file is both the pytest module (CPython side, bottom) and the MicroPython script it
runs (``micropython test_update_powercut.py sweep``). The workload is the update's flash
work with the firmware's own ``update_slots`` (boot pointer, selector, trial, commit,
roll-back) and ``files.write_atomic``; the download's file operations are those of
``update_boot.download`` (run at boot: append each piece to the inactive slot's image,
close the file after each request, hash again what is on flash when resumed). A cut falls at each
program/erase in turn; then, on a fresh mount of what was left, the device boots as it
would (the selector, then the update resumed from ``update.json``) until the update has
committed or rolled back. Checked at every boot: the slot the selector picks holds a
verified image (the factory's, or the new one whose SHA-256 the manifest named); the
installed sequence never goes down; in the end the new release is committed.
"""

import sys

try:  # CPython (pytest) side
    import subprocess
    from pathlib import Path

    import pytest

    CPYTHON = True
except ImportError:
    CPYTHON = False

BLOCK_SIZE = 512
BLOCKS = 64  # 32 KiB file system
PIECE = 512  # bytes per piece (``update_boot.BUF_BYTES``)
RANGE = 2048  # bytes per request (smaller than ``RANGE_BYTES``: more cuts per image)
OLD = bytes((i * 7) & 0xFF for i in range(3000))
NEW = bytes((i * 13 + 5) & 0xFF for i in range(6000))


# ---------------------------------------------------------------- MicroPython side

def sha(b):
    import hashlib

    return hashlib.sha256(b).digest()


def hexd(b):
    return "".join("%02x" % x for x in b)


def factory(root):
    import os

    from cityedge_fw import update_slots as slots

    os.mkdir(slots.slot_dir(root, "a"))
    with open(slots.image_path(root, "a"), "wb") as f:
        f.write(OLD)
    slots.write_pointer(root, {"slot": "a", "seq": 1, "version": "1.0.0", "keys": 1,
                               "trial": None, "last": None})


def accepted(root):
    """``update_check.run``'s ``ok``: ``update.json`` downloading, the old image gone."""
    import json

    from cityedge_fw import update_slots as slots
    from cityedge_fw.files import write_atomic

    slots.remove(slots.image_path(root, "b"))
    write_atomic(slots.path(root, slots.UPDATE), json.dumps({
        "state": "downloading", "version": "1.1.0", "seq": 2, "size": len(NEW),
        "sha256": hexd(sha(NEW)), "keys": 1, "slot": "b"}))


def download_and_install(root):
    """``update_boot.download``'s flash work, the trial set at its end (module doc)."""
    import hashlib
    import json
    import os

    from cityedge_fw import update_slots as slots
    from cityedge_fw.files import write_atomic

    pend = slots.read_json(slots.path(root, slots.UPDATE))
    image = slots.image_path(root, "b")
    if pend["state"] == "downloading":
        try:  # noqa: SIM105 (no contextlib on MicroPython)
            os.mkdir(slots.slot_dir(root, "b"))
        except OSError:
            pass
        h = hashlib.sha256()
        try:
            have = os.stat(image)[6]
        except OSError:
            have = 0
        if have:
            with open(image, "rb") as f:
                h.update(f.read())
        while have < len(NEW):
            end = min(len(NEW), have + RANGE)
            with open(image, "ab") as f:
                while have < end:
                    piece = NEW[have:min(end, have + PIECE)]
                    f.write(piece)
                    h.update(piece)
                    have += len(piece)
        if h.digest() != sha(NEW):
            slots.remove(image)
            slots.finish(root, ["failed", "1.1.0", 2, "artifact_digest"])
            return
        pend["state"] = "installing"
        write_atomic(slots.path(root, slots.UPDATE), json.dumps(pend))
    slots.start_trial(root, "b", 2, "1.1.0", 1)


def boot(root, healthy):
    """One boot: the selector, a check of what it boots, then the running release's
    update work. Returns the slot booted."""
    from cityedge_fw import update_slots as slots

    before = slots.read_pointer(root)["seq"]
    slot = slots.select(root)
    with open(slots.image_path(root, slot), "rb") as f:
        booted = f.read()
    p = slots.read_pointer(root)
    assert booted == (NEW if slot == "b" else OLD), "slot %s holds an unverified image" % slot
    assert p["seq"] >= before, "installed sequence went down"
    pend = slots.read_json(slots.path(root, slots.UPDATE))
    if p["trial"]:
        if healthy:
            slots.commit(root, p)
    elif pend and pend.get("state") == "checking":
        accepted(root)
    elif pend and (pend.get("state") == "downloading" or (
            pend.get("state") == "installing" and pend["seq"] > p["seq"])):
        download_and_install(root)  # (``update_check._update``'s condition)
    elif pend:  # done, or a commit cut before ``update.json`` was removed: over
        slots.remove(slots.path(root, slots.UPDATE))
    return slot


def scheduled(root):
    """The agent fetched the manifest: ``update.json`` ``checking`` (the boot checks)."""
    import json

    from cityedge_fw import update_slots as slots
    from cityedge_fw.files import write_atomic

    write_atomic(slots.path(root, slots.UPDATE), json.dumps({"state": "checking"}))


KEPT = []  # the flash operation count once the update was kept (``checking`` written)


def workload(root, flash):
    factory(root)
    boot(root, True)  # the old release runs
    scheduled(root)
    if not KEPT:
        KEPT.append(flash.ops)
    boot(root, True)  # the boot check: ok
    boot(root, True)  # downloads, installs (trial set)
    boot(root, True)  # the trial boots and commits


def run_once(base, cut_at, mode, tear, healthy):
    import vfs

    from simbus import CutFlash, PowerCut

    flash = CutFlash(BLOCK_SIZE, BLOCKS, base, cut_at, mode, tear)
    vfs.mount(vfs.VfsLfs2(flash), "/flash")
    cut = False
    try:
        workload("/flash", flash)
    except (PowerCut, OSError):  # OSError: one failed write ("flaky"): the device resets
        cut = True
    try:  # noqa: SIM105 (no contextlib on MicroPython)
        vfs.umount("/flash")
    except Exception:  # a dead file system may not unmount cleanly
        pass
    fresh = CutFlash(BLOCK_SIZE, BLOCKS, flash.image())
    vfs.mount(vfs.VfsLfs2(fresh), "/flash")
    try:
        import os

        from cityedge_fw import update_slots as slots

        try:  # the pointer is written after the factory image: before it, no device yet
            os.stat(slots.path("/flash", slots.POINTER))
        except OSError:
            return flash.ops, cut, "factory"
        boots = []
        for _ in range(8):  # the device boots until the update is over
            boots.append(boot("/flash", healthy))
            p = slots.read_pointer("/flash")
            pend = slots.read_json(slots.path("/flash", slots.UPDATE))
            if not p["trial"] and (pend is None or pend.get("state") == "done") and \
                    (p["seq"] == 2 or p["last"]):
                break
        p = slots.read_pointer("/flash")
        if healthy and cut_at < KEPT[0] and p["seq"] == 1 and not slots.read_json(
                slots.path("/flash", slots.UPDATE)):
            return flash.ops, cut, "not started"  # cut before the update was kept
        if healthy:
            assert (p["slot"], p["seq"]) == ("b", 2), "not committed: %r" % p
        else:
            assert p["slot"] == "a" or p["seq"] == 2, p
    finally:
        vfs.umount("/flash")
    return flash.ops, cut, p["slot"]


def mp_main(argv):
    import vfs

    here = argv[0].rsplit("/", 1)[0] if "/" in argv[0] else "."
    sys.path.insert(0, here)
    sys.path.insert(0, here + "/../../firmware")
    from simbus import CutFlash

    blank = CutFlash(BLOCK_SIZE, BLOCKS)
    vfs.VfsLfs2.mkfs(blank)
    base = blank.image()
    total = run_once(base, -1, "fail", 0, True)[0]
    modes = ("fail", "tear", "flaky")
    for cut_at in range(total):
        mode = modes[cut_at % 3]
        try:
            run_once(base, cut_at, mode, cut_at * 7, True)
        except AssertionError:
            print("FAILED at cut=%d mode=%s" % (cut_at, mode))
            raise
    # a release that never gets healthy: its boots run out, the selector rolls back
    vfs.mount(vfs.VfsLfs2(CutFlash(BLOCK_SIZE, BLOCKS, base)), "/flash")
    from cityedge_fw import update_slots as slots

    factory("/flash")
    scheduled("/flash")
    boot("/flash", False)
    boot("/flash", False)
    seen = [boot("/flash", False) for _ in range(slots.TRIAL_BOOTS + 1)]
    p = slots.read_pointer("/flash")
    assert seen == ["b"] * slots.TRIAL_BOOTS + ["a"], seen
    assert (p["slot"], p["seq"], p["last"][0]) == ("a", 1, "rolled-back"), p
    vfs.umount("/flash")
    print("OK sweep cuts=%d" % total)


if not CPYTHON and __name__ == "__main__":
    mp_main(sys.argv)


# ---------------------------------------------------------------- CPython (pytest) side

if CPYTHON:
    HERE = Path(__file__).resolve().parent
    MICROPYTHON = HERE.parents[1] / ".venv" / "bin" / "micropython"

    def test_power_cut_at_every_write_of_the_update_boots_a_verified_version() -> None:
        if not MICROPYTHON.exists():
            pytest.fail("micropython not found: run `make setup`")
        proc = subprocess.run([str(MICROPYTHON), "-X", "heapsize=512k",
                               str(HERE / "test_update_powercut.py"), "sweep"],
                              capture_output=True, text=True, timeout=600, cwd=HERE)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("OK"), proc.stdout
        assert int(last.split("cuts=")[1]) > 50  # the path really writes flash many times
