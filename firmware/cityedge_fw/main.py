"""Boot entry of the device: provisioning mode while not locked, then the agent.

A board's ``main.py`` (written by ``make firmware``) calls ``boot()``: the HAL gives the
board's flash root, its provisioning UART and its ``info`` (``hal.board_class()``); while
the device is not locked, provisioning mode runs on that UART
(``provision_main.board_boot``, which also retries a pending offline enrollment); after a
fresh lock the board resets so the agent starts from a clean heap; a locked device starts
the agent at once. The unix port boots the same way (its board takes the flash root and
the UART from the environment: ``hal/unix.py``); the simulator, the firmware tests and
the benchmark run this same ``boot()``.

The agent's boot order, the smallest heap first in mind (``docs/ARCHITECTURE.md``,
"Memory on the device"):

1. ``config.load``: the JSON file on the flash root, checked, the ``agent`` section not yet
   (its limits live with the agent's module);
2. the TLS context: mbedTLS parses the certificates in blocks of up to 3 KiB, which a
   64 KiB heap has in one piece only this early;
3. the device key (``keys``), then the ``agent`` section (``config.check_agent``:
   ``settings``, which imports nothing of the agent);
4. the HAL board and its sensors;
5. the store, the state file and the ``Agent``; every module the running agent loads
   only for a moment is loaded and unloaded once, so that its names are interned now
   (``build``); the boot-only modules are unloaded (``cityedge_fw.unload``) and this
   module is emptied (``_drop_boot_code``) before the agent runs.

Measured heap (issue 13; unix port, 64-bit, code in the built ROMFS image, the unix HAL
board with one simulated SHT3x; KiB in use after a collection at 256 KiB, after boot /
the most while streaming 20 s / interned names, ``micropython.qstr_info()``):

================================================================  ====  ======  =============
step                                                              boot  stream  names
================================================================  ====  ======  =============
before                                                            66.2  71.8    682 (6 pools)
``limits`` copies, MQTT test-only constants private, per-type     65.2  70.8    630 (6)
sensor wiring
byte/str constants folded, no ``uasyncio``, unix ``info`` in      58.1  63.8    612 (5)
``unix_io``
topics under ``topic_prefix`` (+24 names), paid for by name cuts  58.1  63.6    610 (5)
final of that round                                               58.1  63.6    609 (5)
the last item's start (answers, rotation, update hooks merged)    58.9  64.4    619 (5)
on-demand names interned before the board and agent; MQTT's       58.3  63.9    615 (5)
test-only API in tests; no store ``__repr__``
the same, measured as below (256 KiB, 20 s)                       58.5  64.0    616 (5)
test-only ``RingBuffer.seqs``/``oldest``, ``rfc6979_nonce`` in    58.1  63.6    608 (5)
tests; ``mac_urn`` and MAC ``device_id`` in ``hal.mcu``; the
status map encoded straight into one buffer (``status_cbor``)
the start of the next round (error family's cut reverted)         57.7  63.2    614 (5)
a collection every 1 KiB allocated from ``boot`` on               57.7  63.3    614 (5)
(``_GC_EVERY``): no less in use, the free heap in one piece
the watchdog loop inline in ``Agent.run``                         57.6  63.0    613 (5)
the start of the round after                                      57.9  63.3    613 (5)
sampler, watchdog in ``run``'s task, status in the forwarder's    57.8  62.4    612 (5)
the link's reconnect loop its task's coroutine, reads inline      57.8  62.1    612 (5)
the error family by ``type`` on MicroPython (no class statement)  56.8  61.2    614 (5)
MQTT's messages one string constant (``errors.text``)             55.9  60.3    614 (5)
the store's, COSE's, the batch's and the agent's the same         55.0  59.4    614 (5)
the start of the next round (the same code, measured again)       55.3  59.6    614 (5)
a signature's integers at most 512 bits (no 98-byte one)          55.3  59.6    614 (5)
================================================================  ====  ======  =============

(``bench/firmware.py``'s ``board_path_heap``: the two rows before "the same" at 72 KiB,
30 s; the rest at 256 KiB, 20 s.) It boots and streams at 64 KiB with no MemoryError
(``tests/firmware/test_boot.py``'s ``BOOT_HEAP``; 78, then 72, 70, 68 and 66 before): the
last MemoryErrors survived there were seals signed while a status was being written,
gone since ``mqtt_async.send`` writes before it waits (docs/ARCHITECTURE.md, "Memory on
the device").
Five pools hold the names; the sixth is 7.5 KiB in one block, so each new module must free
names to pay for its own.
``trust-update`` (``answers``, ``boot_answer.run``) interns two names at boot
(``.trust.new``, ``trust-update``); a rotation's command (``rotation_device``) and the
messages a boot kept for the agent (``answers.publish_unsent``) add none (their file
names are over 10 characters: constants, not names). The tests' stand-in board: see
``fw_harness.HEAP``.

The configuration is a JSON map (checked by ``config.load``):

``broker``     ``{"host": ..., "port": 8883, "server_hostname": ...}``
``tls``        paths of DER files: ``{"cert": ..., "key": ..., "ca": ...}``; the key is the
               device's P-256 key (SEC1 or PKCS#8 DER), used for TLS *and* batch signing
``fleet_keys`` paths of fleet public keys (65-byte SEC1 points) trusted for commands
``store``      ``{"dir": "/buffer", "state": "/state.cbor"}``
``topic_prefix`` optional, ``"ce/v1"`` (``topics.PREFIX``) only: the agent's topics are
               ``topics.device_topics(device, prefix)``, worked out in ``build``
``agent``      agent settings (``settings.DEFAULTS``); ``device`` overrides the board's URN

Errors that stop the boot (no key, no certificate) are printed and re-raised: the board
then resets through its watchdog and the technician sees the message on the console.
"""

import gc

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


CONFIG_FILE = "config.json"
_GC_EVERY = const(1024)  # bytes allocated between two collections on a board (``boot``)


def config_path(root):
    return root.rstrip("/") + "/" + CONFIG_FILE


def build(cfg, board=None, board_class=None):
    """Make the ``Agent`` described by ``cfg`` (``config.load(..., agent=False)`` or a full
    ``config.validate``) on ``board``, or on a ``board_class(cfg)`` made after the TLS
    context (the boot order above). The CBOR decoder (the state file) and the boot-only
    modules are unloaded before it returns."""
    from cityedge_core import cose

    # the device key and the fleet's trust store (provisioning reads them from ``keys``
    # itself; imported here, not with this module: a boot step before ``build`` runs
    # without P-256 and COSE on its heap, ``update_check``)
    from .keys import load_fleet_keys, private_key_from_der, read_file
    from .mqtt_async import tls_context

    tls = cfg["tls"]
    try:  # the current key slot: the pointer holds its files' suffix (``key_slots``)
        with open(tls["key"] + ".slot") as f:
            sfx = f.read()
    except OSError:
        sfx = ""  # none yet: slot 0, the provisioned files
    key_der = read_file(tls["key"] + sfx)
    gc.collect()
    ssl_ctx = tls_context(read_file(tls["cert"] + sfx), key_der, read_file(tls["ca"]))
    # the kid from a throwaway copy of the key: a key keeps its public point once asked
    # for it, and the signing key would keep it on the heap for good (0.7 KiB)
    kid = cose.kid_for_public_key(private_key_from_der(key_der).public_key().to_sec1())
    key = private_key_from_der(key_der)
    del key_der
    # the provisioned seed, or the root's statement installed (``trust_check``: the
    # state file + ".trust", spelled from the pending file's name: one interned name less)
    fleet_keys = load_fleet_keys(cfg.get("fleet_keys", ()), (cfg.get("store", {}).get(
        "state", "/state.cbor") + ".trust.new")[:-4])
    gc.collect()
    from . import config

    config.check_agent(cfg)  # settings (the agent's module loads below)
    del config
    from . import ON_DEMAND, agent, store, unload

    unload("cityedge_fw.config", "cityedge_fw.settings", "cityedge_fw.keys")
    gc.collect()
    # Every module the running agent loads for a moment only (the drop ledger, the link's
    # backoff, the command gate and the decoders) is loaded once now, then unloaded, so
    # that its names are interned at boot, before the board, its sensors and the agent
    # take their ~8 KiB (the boot's peak is here: a 68 KiB heap had no room for a decoder
    # loaded after them). Interned names stay (``unload``) in pools that
    # never shrink; when the last pool is full the next new name takes a pool twice its
    # size in one block (the sixth: 640 names, 7.5 KiB), which a heap cut up by streaming
    # does not have: a drop, a command or a reconnect whose module brought a new name has
    # failed with 10 KiB free and 4 KiB the largest free block. After this the running
    # agent interns no name (the firmware tests check that no pool is added).
    for name in ("cityedge_fw.drops", "cityedge_fw.backoff", "cityedge_core.command_gate",
                 "cityedge_core.cbor_decode", "cityedge_fw.answers"):
        __import__(name)
        unload(name)
    unload(*ON_DEMAND)
    gc.collect()
    if board is None:
        board = board_class(cfg)
    checked = cfg["agent"]
    checked["tls"] = tls  # the key slots' paths, for a rotation (``rotation_device``)
    checked["update"] = cfg.get("update")  # the update's section (``update_agent``)
    st = cfg.get("store", {})
    broker = cfg["broker"]
    device = cfg.get("device") or board.device_id()
    # the agent's topics under the configured prefix, from the core's topic scheme (loaded
    # for this only: the running agent keeps the four strings)
    from cityedge_core import topics

    names = topics.device_topics(device, cfg.get("topic_prefix", topics.PREFIX))
    topics = None
    unload("cityedge_core.topics")
    a = agent.Agent(
        board, device, key, kid,
        store.RingBuffer(st.get("dir", "/buffer"), checked["buffer_budget_bytes"]),
        store.State(st.get("state", "/state.cbor")),
        checked, broker["host"], broker.get("port", 8883), ssl_ctx,
        broker.get("server_hostname"), fleet_keys, board.sensors(cfg), names)
    unload(*ON_DEMAND)  # the state file's decoder
    try:  # messages a boot signed (a trust-update's or a rotation's answer, a CSR): the
        # agent publishes them once connected (``answers.publish_unsent``)
        from os import stat

        stat(a.state.path + ".unpublished")
        from . import answers

        answers.publish_unsent(a)
        answers = None
        unload("cityedge_fw.answers")
    except OSError:
        pass
    gc.collect()
    return a


def main(uart=None, info=None, root="/", reset=None, agent=None,
         board_class=None, run_agent=None, config_file=None):
    """Boot: provisioning mode while not locked (given the board's ``uart`` and ``info``
    ``{"model", "serial", "device", "firmware"}``), then the agent: built in the boot
    order above and run by ``run_agent(agent)`` (default: the board's ``run_agent``,
    forever), or (a test's hook) ``agent(cfg, board)``. The configuration is
    ``config.json`` on ``root`` (``config_file``: another file, for older test setups).

    Returns False if the provisioning line closed without a lock (only a test's UART
    does that), True after ``reset()`` returned (a real reset never does)."""
    from . import ON_DEMAND, config, state_path, unload

    if uart is not None:
        from . import provision, provision_main

        fresh = not provision.is_locked(root)
        if reset is None:
            import machine  # type: ignore[import-not-found]

            reset = machine.reset
        if not provision_main.board_boot(uart, root, info, reset=reset):
            return False
        if fresh:
            gc.collect()
            reset()  # the agent starts on the next boot, from a clean heap
            return True
        del provision, provision_main
        unload("cityedge_fw.provision_main", "cityedge_fw.provision")
    cfg = config.load(config_file or config_path(root), agent=False)
    del config
    # a trust-update's statement (``trust_check``), a rotation command (``rotation_device``)
    # or an update in progress: carried out now, in the boot's empty heap
    # (``update_check``), then the board resets
    from os import stat

    state = state_path(cfg)
    kept = None
    if cfg.get("update"):  # an update command the agent kept or has not answered yet:
        # the state file's CBOR holds the key ``update_cmd`` with a value other than null
        # (``store.State``; not decoded here: ``update_check`` does)
        try:
            with open(state, "rb") as f:
                kept = f.read()
            kept = kept.find(b"jupdate_cmd") >= 0 and kept.find(b"jupdate_cmd\xf6") < 0
        except OSError:
            kept = None
    # (``update.agent``: the update's part the agent carries out; it boots at once)
    u = cfg.get("update") and cfg["update"]["dir"].rstrip("/")
    for f in (state + ".trust.new", state + ".rotation.new", u and u + "/update.agent",
              u and u + "/update.json"):
        try:
            if f:
                stat(f)
                break
        except OSError:
            pass
    else:
        f = kept
    if f and not (u and f == u + "/update.agent"):
        # the configuration's checker and what it imported off the heap (``build`` loads
        # them again): the boot step has the room
        unload("cityedge_fw.config", "cityedge_core.batch", "cityedge_core.cose",
               "cityedge_core.cbor", "cityedge_core.topics")
        gc.collect()
        from . import update_check

        step = update_check.run(cfg)
        if step:
            if step == 2:  # (``update_check.CHECK``) the release's check: its own module,
                # with the dispatcher and the state's decoder off the heap (the update's
                # peak); named by a string, not a name this module interns at every boot
                del update_check
                unload("cityedge_fw.update_check", "cityedge_fw.store", *ON_DEMAND)
                gc.collect()
                __import__("cityedge_fw.update_verify", None, None, ("run",)).run(cfg)
            gc.collect()
            reset()  # the check's names stay interned: the agent boots without them
            return True
        del update_check
        unload("cityedge_fw.update_check", "cityedge_fw.update_slots")
    if board_class is None:
        from . import hal

        board_class = hal.board_class()
    if agent is not None:
        return agent(cfg, board_class(cfg))
    a = build(cfg, board_class=board_class)
    run = run_agent or board_class.run_agent
    del cfg, board_class  # the parsed file: the agent keeps what it uses
    _drop_boot_code()
    return run(a)


def _drop_boot_code():
    """Empty this module before the agent runs (on MicroPython). The frames of ``boot``
    and ``main`` stay on the stack as long as the agent runs, and a running function keeps
    its module's globals alive: this module's functions and, through the three imported
    from ``keys``, that module's too (1.7 KiB on the unix port). ``main`` and ``boot``
    read no global after this; the next import loads the module again. On CPython nothing
    is dropped (tests call ``main`` again; ``cityedge_fw.unload``)."""
    import sys

    if sys.implementation.name != "micropython":
        return
    from . import unload

    collect = gc.collect  # the module's ``gc`` is gone below
    unload("cityedge_fw.main")
    globals().clear()
    collect()


def boot(run_agent=None):
    """The board's entry (``main.py``): its flash root, provisioning UART, ``info`` and
    reset from the HAL (``hal.board_class()``), then ``main``. ``run_agent(agent)``
    replaces the board's way of running the agent (the tests' supervisor).

    A collection every ``_GC_EVERY`` bytes allocated, from here on (``gc.threshold``):
    the boot's temporaries (parsed file, DER bytes, modules loaded for a moment, the key's
    integers) are then freed while it goes, so what stays is packed low and the free heap
    is left in one piece, not in holes between them (docs/ARCHITECTURE.md, "Memory on the
    device": after boot the largest free block at 66 KiB was 576 bytes, too small for the
    TLS socket); streaming keeps it that way for the signatures' integers."""
    if hasattr(gc, "threshold"):  # MicroPython
        gc.threshold(_GC_EVERY)
    from . import hal

    board_class = hal.board_class()
    root = board_class.flash_root()
    uart = board_class.provisioning_uart()
    info = board_class.info(root) if uart is not None else None
    del hal
    gc.collect()
    return main(uart, info, root, board_class.reset, board_class=board_class,
                run_agent=run_agent)
