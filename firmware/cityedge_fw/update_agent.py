"""The device's update agent: the fleet's signed ``update`` command to a committed (or
rolled-back) release. Loaded only while an update is in progress, by ``Agent``.

States (hawkBit's vocabulary; each one reported in the signed status as ``update``:
``[state, version, sequence, reason]``, kept in the agent's ``State``):

==============  ==========================================================  ==========
state           what happens                                                 where
==============  ==========================================================  ==========
scheduled       the command passed the gate; ``Agent.handle_command`` keeps    agent
                it (``State`` ``update_cmd``) and resets; at the agent's
                start it goes to ``update.json``, the manifest (at most
                2 KiB) and the key list (at most 8 KiB) are fetched to
                flash, and the manifest's SHA-256 must be the command's
checking        the board resets; ``check_update`` runs at boot             ``update_check``
downloading     ``ok``: the artifact is fetched in Range requests of         agent
                ``RANGE_BYTES`` into the inactive slot, hashed as written;
                nothing past the manifest's size is taken
installing      size and SHA-256 match: the boot pointer names the slot as   agent
                a trial (``update_slots.start_trial``), the board resets
trial           the selector boots the new release (a boot counted down);   agent
                it commits once healthy: connected with its certificate
                and one of its own signed batches acknowledged (PUBACK),
                within ``update.trial_s``
committed       the pointer's committed slot, sequence and version move in  ``update_slots``
                one write; an older sequence can never install again
rolled-back     the deadline passed (the release resets, the old one boots) ``update_slots``
                or its boots ran out (the selector rolls back by itself)
failed          refused by a rule, or the download failed: nothing installed ``update_slots``
==============  ==========================================================  ==========

Resume: ``update.json`` says where the update is; after a reboot or a lost link the
download goes on from the slot file's length (the bytes already there are hashed again
from flash first: a hash state does not survive a reset). The file is closed after every
request, so a power cut keeps every byte of the requests before it.

Heap: this module, ``update_http`` and ``update_slots`` (their names are new to the
running agent: loaded with an update only), one ``BUF_BYTES`` buffer reused for every
piece, the SHA-256 state, one TLS connection at a time. Measured: ``tests/firmware/
test_update.py`` (docs/ARCHITECTURE.md, "Device updates").
"""

import gc
import hashlib
import json
import os

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore[no-redef]

from cityedge_core.errors import CityedgeError, LimitError, TransportError

from . import update_slots as slots
from .files import write_atomic

BUF_BYTES = 512  # bytes: the one buffer every piece of a download is read into
# bytes asked for in one Range request (``update.range_bytes``): each is a TLS connection
# of its own, whose handshake dominates on a device (``bench/ota_device.py``, unix port,
# 1 MiB: 47 KB/s with 8 KiB requests, 159 KB/s with 32 KiB); a power cut loses at most the
# one in flight (the file is closed after each)
RANGE_BYTES = 32768
REQUEST_MS = 20000  # ms one request may take, headers to last byte (slow retrieval)
MANIFEST_MAX = 2048  # bytes of a manifest (``update_manifest.MANIFEST_MAX_BYTES``)
KEYS_MAX = 8192  # bytes of a release-key list (``release_keys.LIST_MAX_BYTES``)
TRIES = 6  # requests in a row that may fail before the update fails
RETRY_MS = 500  # ms before the next try, times the tries so far
TRIAL_S = 120  # s a trial release has to prove itself healthy (``update.trial_s``)

SCHEDULED = "scheduled"
CHECKING = "checking"
DOWNLOADING = "downloading"
INSTALLING = "installing"
TRIAL = "trial"


def _hex(b):
    return "".join("%02x" % x for x in b)


def report(agent, state, version=None, seq=None, reason=""):
    rep = [state, version, seq, reason]
    if agent.state.get("update") != rep:
        agent.state.set(update=rep)


def _conf(agent):
    return agent.cfg["update"]


def _pending_path(agent):
    return slots.path(_conf(agent)["dir"], slots.UPDATE)


def run(agent):
    """The agent's one entry, at its start: a new command (``State`` key ``update_cmd``
    ``[args, time, seq]``, kept by ``Agent.handle_command``, which then reset the board)
    or the update in progress. Once taken, ``update_cmd`` becomes ``[None, None, seq]``
    until the command is answered (``_answer``): while it is set, the agent does not
    answer the fleet's resends of that seq, and this module is loaded at every start."""
    cmd = agent.state.get("update_cmd")
    if cmd and cmd[0] is not None:
        seq = cmd[2] if len(cmd) > 2 else None
        pend = slots.read_json(_pending_path(agent))
        task = None
        if not pend or pend.get("state") == "done":
            task = accept(agent, cmd[0], cmd[1], seq)
        elif pend.get("cmd") != seq:  # another update runs: this one is refused
            if seq is not None:
                asyncio.create_task(_refuse(agent, seq, "busy: update sequence %s is %s"
                                            % (pend.get("seq"), pend.get("state"))))
            seq = pend.get("cmd")  # the one still to be answered
        # (else: taken before a power cut, the state not moved on yet)
        agent.state.set(update_cmd=[None, None, seq])
        if task is not None:
            return task
    return resume(agent)


def accept(agent, args, now, cmd=None):
    """A signed ``update`` command (``now``: the trusted time it was accepted at; ``cmd``:
    its seq): keep it, then fetch its manifest (a task). Its arguments are checked in full
    at boot (``update_manifest.update_args``); here only what keeping them needs."""
    url = args.get(1) if isinstance(args, dict) else None
    digest = args.get(2) if isinstance(args, dict) else None
    if not isinstance(url, str) or not url.startswith("https://") or len(url) > 256 or \
            not isinstance(digest, bytes) or len(digest) != 32:
        rep = [slots.FAILED, None, None, "malformed: update arguments"]
        slots.finish(_conf(agent)["dir"], rep)  # the outcome ``_answer`` answers
        report(agent, *rep)
        return None
    pend = slots.read_json(_pending_path(agent))
    if pend and pend.get("state") != "done":
        agent.last_error = "update: one is in progress (%s)" % pend.get("state")
        return None
    write_atomic(_pending_path(agent), json.dumps(
        {"state": SCHEDULED, "url": url, "digest": _hex(digest),
         "now": now, "cmd": cmd}))
    report(agent, SCHEDULED)
    return asyncio.create_task(_fetch_release(agent))


def resume(agent):
    """At the agent's start: report what the selector or the boot check decided, and go
    on with an update in progress (a task), or watch a trial release's health."""
    conf = _conf(agent)
    root = conf["dir"]
    p = slots.read_pointer(root)
    pend = slots.read_json(_pending_path(agent))
    if p["trial"]:
        t = p["trial"]
        report(agent, TRIAL, t["version"], t["seq"])
        return asyncio.create_task(_watch_trial(agent, root, conf.get("trial_s", TRIAL_S)))
    if pend and (pend.get("state") == "done" or pend.get("seq", p["seq"] + 1) <= p["seq"]):
        slots.remove(_pending_path(agent))  # over: reported below (or a commit cut short)
        pend = None
    if pend:
        state = pend.get("state")
        if state == SCHEDULED:
            report(agent, SCHEDULED)
            return asyncio.create_task(_fetch_release(agent))
        if state == DOWNLOADING:
            report(agent, DOWNLOADING, pend["version"], pend["seq"])
            return asyncio.create_task(_download(agent, pend))
        if state == INSTALLING:  # a cut before the pointer write: do it now
            return asyncio.create_task(_install(agent, pend))
    if p["last"]:
        report(agent, *p["last"])
    if _cmd_seq(agent) is not None:  # decided (pointer ``last``), not answered yet
        return asyncio.create_task(_answer(agent))
    return None


def _fail(agent, version, seq, reason):
    slots.finish(_conf(agent)["dir"], [slots.FAILED, version, seq, reason])
    report(agent, slots.FAILED, version, seq, reason)
    agent.last_error = "update: " + reason
    asyncio.create_task(_answer(agent))


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


async def _fetch(agent, url, start, end, buf, sink, total_max):
    """One request with retries; the bytes taken. Raises after ``TRIES`` failures."""
    from . import update_http

    tries = 0
    timeout_ms = _conf(agent).get("request_ms", REQUEST_MS)
    while True:
        try:
            n = await update_http.get(url, start, end, agent.link.ssl_ctx, buf, sink,
                                      timeout_ms, total_max)
            if n:
                return n
            raise TransportError("http: no bytes in the response")
        except LimitError:
            raise
        except (OSError, CityedgeError, asyncio.TimeoutError) as e:
            tries += 1
            agent.last_error = "update: %s (try %d)" % (e or "timeout", tries)
            if tries >= TRIES:
                raise CityedgeError("failed %d times: %s" % (tries, e or "timeout")) from None
        gc.collect()
        await asyncio.sleep_ms(RETRY_MS * tries)


async def _fetch_small(agent, url, top, file, buf, h=None):
    """``url`` (at most ``top`` bytes) into ``file``; its SHA-256 if ``h`` is given."""
    with open(file, "wb") as f:
        def sink(mv):
            f.write(mv)
            if h is not None:
                h.update(mv)

        n = await _fetch(agent, url, 0, top, buf, sink, top)
    if n > top:  # the range asked for one byte more than allowed: there was more
        raise LimitError("%s: over %d bytes" % (url, top))
    return n


async def _fetch_release(agent):
    """``scheduled``: the manifest and the key list to flash, the digest checked, then
    reset into the boot check."""
    root = _conf(agent)["dir"]
    pend = slots.read_json(_pending_path(agent))
    url = pend["url"]
    buf = bytearray(BUF_BYTES)
    d = slots.path(root, "update")
    try:
        os.mkdir(d)
    except OSError:
        pass
    try:
        h = hashlib.sha256()
        await _fetch_small(agent, url + "manifest", MANIFEST_MAX, d + "/manifest", buf, h)
        digest = h.digest()
        expected = bytes(int(pend["digest"][i:i + 2], 16) for i in range(0, 64, 2))
        diff = 0
        for i in range(32):  # no early exit
            diff |= digest[i] ^ expected[i]
        if diff:
            _fail(agent, None, None, "manifest_digest: the manifest is not the one the "
                  "command names")
            return
        await _fetch_small(agent, url + "keys", KEYS_MAX, d + "/keys", buf)
    except (OSError, CityedgeError) as e:
        _fail(agent, None, None, "fetch: %s" % e)
        return
    pend["state"] = CHECKING
    write_atomic(_pending_path(agent), json.dumps(pend))
    report(agent, CHECKING)
    _reset(agent)


def _file_size(file):
    try:
        return os.stat(file)[6]
    except OSError:
        return 0


async def _download(agent, pend):
    """``downloading``: Range requests from the slot file's length to the manifest's size,
    each piece hashed and appended; then ``installing``."""
    root = _conf(agent)["dir"]
    slot, size, version, seq = pend["slot"], pend["size"], pend["version"], pend["seq"]
    image = slots.image_path(root, slot)
    try:
        os.mkdir(slots.slot_dir(root, slot))
    except OSError:
        pass
    buf = bytearray(BUF_BYTES)
    h = hashlib.sha256()
    have = _file_size(image)
    if have > size:  # cannot happen (nothing past the size is written); start over
        slots.remove(image)
        have = 0
    if have:  # resumed: what is on flash is hashed again
        print("update: resumed at %d of %d bytes" % (have, size))
        with open(image, "rb") as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
    step = _conf(agent).get("range_bytes", RANGE_BYTES)
    peak = 0  # heap in use after a collection, per request (reported at the reset)
    try:
        while have < size:
            end = min(size, have + step) - 1
            with open(image, "ab") as f:
                def sink(mv):
                    f.write(mv)
                    h.update(mv)

                n = await _fetch(agent, pend["url"] + "artifact", have, end, buf, sink, size)
            have += n
            gc.collect()
            peak = max(peak, gc.mem_alloc())
    except LimitError as e:
        slots.remove(image)
        _fail(agent, version, seq, "artifact_too_long: %s" % e)
        return
    except (OSError, CityedgeError) as e:
        _fail(agent, version, seq, "download: %s" % e)  # a new command starts over
        return
    digest = h.digest()
    expected = pend["sha256"]
    diff = 0
    for i in range(32):  # no early exit
        diff |= digest[i] ^ int(expected[2 * i:2 * i + 2], 16)
    if diff:
        slots.remove(image)
        _fail(agent, version, seq, "artifact_digest: the artifact's SHA-256 differs from "
              "the manifest's")
        return
    pend["state"] = INSTALLING
    write_atomic(_pending_path(agent), json.dumps(pend))
    print("update: download heap peak %d" % peak)
    await _install(agent, pend)


async def _install(agent, pend):
    """``installing``: the verified slot becomes the next boot's trial, then reset."""
    report(agent, INSTALLING, pend["version"], pend["seq"])
    slots.start_trial(_conf(agent)["dir"], pend["slot"], pend["seq"], pend["version"],
                      pend["keys"])
    _reset(agent)


async def _watch_trial(agent, root, trial_s):
    """``trial``: commit once connected and one own batch acknowledged, within
    ``trial_s``; otherwise roll back and reset."""
    start = agent.link.clock()
    while agent.link.clock() - start < trial_s * 1000:
        if agent.link.connects and agent.published:
            p = slots.read_pointer(root)
            slots.commit(root, p)
            report(agent, *p["last"])
            await _answer(agent)
            return
        await asyncio.sleep_ms(200)
    p = slots.read_pointer(root)
    reason = "health: no batch acknowledged by the broker within %d s" % trial_s
    if not agent.link.connects:
        reason = "health: broker not reached within %d s (%s)" % (
            trial_s, agent.link.last_error or "no connection")
    slots.roll_back(root, p, reason)
    report(agent, *p["last"])
    _reset(agent)


# --- the signed result ---------------------------------------------------------------
# The update command is answered once its outcome is decided: ``committed`` -> ``ok``;
# ``rolled-back`` -> ``failed`` with data ``{"state": "rolled-back", ...}``; ``failed``
# -> ``refused`` for a release the rules refuse (the reason code of ``check_update``, a
# manifest that is not the command's, malformed arguments), ``failed`` for a fetch or
# download that did not succeed (the fleet's ``ota.member_status`` reads exactly this).
# The decision is on flash (the boot pointer's ``last``, one atomic write) and the seq in
# ``State`` (``update_cmd``) before anything is signed: a power cut between the decision
# and the publish leaves both, and the next start signs and publishes the result. It is
# kept with the other answers (``answers``), so a resend of the command gets it again.

_FAILURES = ("fetch", "download", "artifact_digest", "artifact_too_long")


def _cmd_seq(agent):
    """The seq of the update command taken and not answered yet, or None."""
    cmd = agent.state.get("update_cmd")
    if cmd and len(cmd) > 2 and cmd[0] is None:
        return cmd[2]
    return None


def outcome(last):
    """``(outcome, detail, data)`` of the result for the pointer's ``last`` outcome."""
    state, version, seq, reason = (list(last) + [None, None, None, ""])[:4]
    data = {"state": state, "version": version, "sequence": seq}
    if state == slots.COMMITTED:
        return "ok", "committed %s (sequence %s)" % (version, seq), data
    if state == slots.ROLLED_BACK:
        return "failed", reason or "rolled back", data
    reason = reason or "failed"
    for prefix in _FAILURES:
        if reason.startswith(prefix):
            return "failed", reason, data
    return "refused", reason, data


async def _wait_connected(agent):
    from .mqtt import CONNECTED

    while agent.link.client.state != CONNECTED:
        await asyncio.sleep_ms(200)


async def _answer(agent):
    """Answer the update command taken (``_cmd_seq``) with its outcome once connected;
    then it is done (``update_cmd`` cleared, ``update.json`` removed)."""
    seq = _cmd_seq(agent)
    if seq is None:
        return
    await _wait_connected(agent)
    root = _conf(agent)["dir"]
    last = slots.read_pointer(root)["last"] or [slots.FAILED, None, None,
                                                "no outcome recorded"]
    kind, detail, data = outcome(last)
    await _result(agent, seq, kind, detail, data)
    if _cmd_seq(agent) == seq:
        agent.state.set(update_cmd=None)
        pend = slots.read_json(_pending_path(agent))
        if pend is None or pend.get("state") == "done":
            slots.remove(_pending_path(agent))


async def _refuse(agent, seq, why):
    await _wait_connected(agent)
    await _result(agent, seq, "refused", why, None)


async def _result(agent, seq, kind, detail, data):
    """The kept answer of ``seq`` again if there is one, else sign, keep and publish."""
    from . import answers, unload

    try:
        for s, d in answers._kept(agent):
            if s == seq:
                await answers._send(agent, d)
                return
        gc.collect()
        await answers._signed(agent, "update", seq, kind, detail, data)
    finally:
        answers = None
        unload("cityedge_fw.answers")
