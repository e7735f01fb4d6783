"""The update's network stages, run at boot before the agent is built (``main.main`` ->
``update_check.run``), each in a boot of its own, the board reset after it:

- ``scheduled``: the manifest (at most ``MANIFEST_MAX`` bytes) and the release-key list
  (at most ``KEYS_MAX``) to flash, the manifest's SHA-256 compared with the command's;
  then ``checking`` (the next boot's ``update_verify``);
- ``downloading``: the artifact in Range requests of ``RANGE_BYTES`` (``update.range_bytes``)
  appended to the inactive slot's image, hashed as written; nothing past the manifest's
  size is taken; the size and SHA-256 must match; then ``installing``: the slot becomes the
  next boot's trial (``update_slots.start_trial``).

Why at boot: run beside the streaming agent, these stages (this code, ``update_http``, a
second TLS connection beside the agent's) needed 84 KiB of heap, 75.4 KiB in use while
downloading (docs/ARCHITECTURE.md, "Device updates"). Here the agent is not built: the
heap holds the configuration, the TLS context, asyncio and this. The agent is not
sampling meanwhile: it sealed the readings it had collected before its reset
(``update_agent._reset``), and the next boot's agent goes on with the chain; the pause is
this stage's time (printed: ``update: boot stage ... ms``). A stage ends: every request
has a deadline (``update.request_ms``) and at most ``TRIES`` fail in a row before the
update fails. The board's watchdog is started by the agent's first feed, after the boot.

Resume: ``update.json`` says where the update is; a power cut or a failed request goes on
from the slot file's length (the bytes already there are hashed again from flash first: a
hash state does not survive a reset). The file is closed after every request, so a cut
keeps every byte of the requests before it.

A failure ends the update (``update_slots.finish``: ``failed`` and the reason, the pointer's
``last``); the next agent reports and answers it (``update_agent.resume``).
"""

import asyncio  # MicroPython 1.25+ (ROMFS): no ``uasyncio`` fallback, one name less
import gc
import hashlib
import json
import os
import time

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

SCHEDULED = "scheduled"
CHECKING = "checking"
DOWNLOADING = "downloading"
INSTALLING = "installing"


def _tls(tls):
    """The device's TLS context, from the current key slot (as ``main.build`` makes it):
    the city CA verifies the artifact server."""
    import tls as _tls  # type: ignore[import-not-found]

    try:  # the key slot's suffix (``key_slots``)
        with open(tls["key"] + ".slot") as f:
            sfx = f.read()
    except OSError:
        sfx = ""
    # (``mqtt_async.tls_context``'s steps: that module would bring MQTT onto this heap)
    ctx = _tls.SSLContext(_tls.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(_read(tls["cert"] + sfx), _read(tls["key"] + sfx))
    ctx.load_verify_locations(_read(tls["ca"]))
    ctx.verify_mode = _tls.CERT_REQUIRED
    return ctx


def _read(file):
    with open(file, "rb") as f:
        return f.read()


def run(cfg, pend):
    """Carry out the stage ``pend`` (``update.json``) is in; True (``main`` resets)."""
    u = cfg["update"]
    stage = pend.get("state")
    t0 = time.ticks_ms()
    try:
        ctx = _tls(cfg["tls"])
        gc.collect()
        if stage == SCHEDULED:
            asyncio.run(fetch_release(u, pend, ctx))
        else:
            asyncio.run(download(u, pend, ctx))
    except MemoryError as e:  # the boot's heap: no boot loop, the update fails
        gc.collect()
        import sys

        sys.print_exception(e)
        _fail(u, pend.get("version"), pend.get("seq"), "download: no heap at boot")
    print("update: boot stage %s took %d ms" % (stage, time.ticks_diff(time.ticks_ms(), t0)))
    return True


def _fail(u, version, seq, reason):
    slots.finish(u["dir"], [slots.FAILED, version, seq, reason])
    print("update: failed: %s" % reason)


async def _fetch(u, url, start, end, ctx, buf, sink, total_max):
    """One request with retries; the bytes taken. Raises after ``TRIES`` failures."""
    from . import update_http

    tries = 0
    timeout_ms = u.get("request_ms", REQUEST_MS)
    while True:
        try:
            n = await update_http.get(url, start, end, ctx, buf, sink, timeout_ms,
                                      total_max)
            if n:
                return n
            raise TransportError("http: no bytes in the response")
        except LimitError:
            raise
        except (OSError, CityedgeError, asyncio.TimeoutError) as e:
            tries += 1
            print("update: %s (try %d)" % (e or "timeout", tries))
            if tries >= TRIES:
                raise CityedgeError("failed %d times: %s" % (tries, e or "timeout")) from None
        gc.collect()
        await asyncio.sleep_ms(RETRY_MS * tries)


async def _fetch_small(u, url, top, file, ctx, buf, h=None):
    """``url`` (at most ``top`` bytes) into ``file``; its SHA-256 if ``h`` is given."""
    with open(file, "wb") as f:
        def sink(mv):
            f.write(mv)
            if h is not None:
                h.update(mv)

        n = await _fetch(u, url, 0, top, ctx, buf, sink, top)
    if n > top:  # the range asked for one byte more than allowed: there was more
        raise LimitError("%s: over %d bytes" % (url, top))
    return n


async def fetch_release(u, pend, ctx):
    """``scheduled``: the manifest and the key list to flash, the digest checked, then
    ``checking`` (the next boot's check)."""
    root = u["dir"]
    url = pend["url"]
    buf = bytearray(BUF_BYTES)
    d = slots.path(root, "update")
    try:
        os.mkdir(d)
    except OSError:
        pass
    try:
        h = hashlib.sha256()
        await _fetch_small(u, url + "manifest", MANIFEST_MAX, d + "/manifest", ctx, buf, h)
        digest = h.digest()
        expected = bytes(int(pend["digest"][i:i + 2], 16) for i in range(0, 64, 2))
        diff = 0
        for i in range(32):  # no early exit
            diff |= digest[i] ^ expected[i]
        if diff:
            _fail(u, None, None, "manifest_digest: the manifest is not the one the command "
                  "names")
            return
        await _fetch_small(u, url + "keys", KEYS_MAX, d + "/keys", ctx, buf)
    except (OSError, CityedgeError) as e:
        _fail(u, None, None, "fetch: %s" % e)
        return
    pend["state"] = CHECKING
    write_atomic(slots.path(root, slots.UPDATE), json.dumps(pend))


def _file_size(file):
    try:
        return os.stat(file)[6]
    except OSError:
        return 0


async def download(u, pend, ctx):
    """``downloading``: Range requests from the slot file's length to the manifest's size,
    each piece hashed and appended; then ``installing`` and the trial set."""
    root = u["dir"]
    slot, size, version, seq = pend["slot"], pend["size"], pend["version"], pend["seq"]
    if pend["state"] == DOWNLOADING:
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
        step = u.get("range_bytes", RANGE_BYTES)
        peak = 0  # heap in use after a collection, per request (printed at the end)
        try:
            while have < size:
                end = min(size, have + step) - 1
                with open(image, "ab") as f:
                    def sink(mv):
                        f.write(mv)
                        h.update(mv)

                    n = await _fetch(u, pend["url"] + "artifact", have, end, ctx, buf, sink,
                                     size)
                have += n
                gc.collect()
                peak = max(peak, gc.mem_alloc())
        except LimitError as e:
            slots.remove(image)
            _fail(u, version, seq, "artifact_too_long: %s" % e)
            return
        except (OSError, CityedgeError) as e:
            _fail(u, version, seq, "download: %s" % e)  # a new command starts over
            return
        digest = h.digest()
        expected = pend["sha256"]
        diff = 0
        for i in range(32):  # no early exit
            diff |= digest[i] ^ int(expected[2 * i:2 * i + 2], 16)
        if diff:
            slots.remove(image)
            _fail(u, version, seq, "artifact_digest: the artifact's SHA-256 differs from "
                  "the manifest's")
            return
        pend["state"] = INSTALLING
        write_atomic(slots.path(root, slots.UPDATE), json.dumps(pend))
        print("update: download heap peak %d" % peak)
    # ``installing``: the verified slot becomes the next boot's trial (``main`` resets);
    # a verdict left from an earlier trial never decides this one
    slots.remove(slots.path(root, "trial.verdict"))
    slots.start_trial(root, slot, seq, version, pend["keys"])
