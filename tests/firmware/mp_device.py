"""A test device for the MicroPython unix port: the real boot and agent on a stand-in board.

``CITYEDGE_FLASH=DIR CE_CONFIG=TEST.json python -m cityedge.romfs --image IMAGE -X
heapsize=64k -c "import mp_device"`` (compiled to .mpy with the firmware, in its ROMFS
image: ``fw_harness.device_argv``/``device_env``) boots as a board boots
(``cityedge_fw.main.main``: ``config.json`` on the flash root ``DIR``, ``config.load``, the
TLS context, keys, settings, the board, the agent; the same order and code as
``main.boot()``), with this stand-in board class instead of the port's HAL board, and runs
the agent under a supervisor until ``stop`` in ``TEST.json`` (the test's own keys) is met:
``{"batches": N}`` (N batches signed and every stored batch acknowledged) and/or
``{"seconds": S}`` and/or ``{"file": PATH}`` (once the test made that file and, unless
``{"drain": False}``, every stored batch is acknowledged) and/or
``{"window": {"warmup_ms": W, "length_ms": L}}`` (the bench:
once connected and W ms in, the counters are marked, and again L ms later). It then
prints one line ``RESULT <json list>`` with counters and heap use (``fw_harness.result``
names them), and exits with status 1 if
the agent ended by itself (a task failed) before that.

The stand-in board is test code: ``sensors`` (default 1) sensors named ``s1``, ``s2`` ...
of two readings each (a temperature that moves in quarter degrees, a humidity), no
watchdog hardware, a UNIX clock unless ``clock`` is false.
"""

import array
import asyncio
import gc
import json
import os
import sys
import time

from micropython import const  # type: ignore[import-not-found]


class Sensor:
    def __init__(self, name, fail_every=0):
        self.name = name
        self.n = 0
        self.fail_every = fail_every

    def read(self):
        self.n += 1
        if self.fail_every and self.n % self.fail_every == 0:
            raise OSError("simulated bus error")
        return [(self.name + "_t", "Cel", 20 + self.n % 7 / 4), (self.name + "_h", "%RH", 40)]


class Board:
    name = "mp-test"

    def __init__(self, cfg):
        # made by the boot from the device's configuration: the test's own keys (``run``)
        # are what it needs; the parsed configuration is not kept on the heap
        test = _BOARD.pop()
        self.device = test["device"]
        self.clock = test.get("clock", True)
        self.fail_every = test.get("fail_every", 0)
        self.count = test.get("sensors", 1)
        self.fed = 0
        _BOARD.append(self)

    def device_id(self):
        return self.device

    def reset(self):
        # the agent's reset (a command kept for the boot): what it survived and the names'
        # pools now (``fw_harness.agent_resets`` reads the line), then the process ends
        agent = _BOARD[-1]
        if agent is not self:
            sys.stdout.write("RESET mem_errors=%d\n" % agent.mem_errors)
            _qstr_info()
        _reset()

    def wdt_feed(self):
        self.fed += 1

    def free_heap(self):
        return gc.mem_free()

    def unix_time(self):
        return int(time.time()) if self.clock else None

    def sensors(self, config):
        return [Sensor("s%d" % (i + 1), self.fail_every) for i in range(self.count)]


_SAMPLES = const(64)  # heap samples kept: a fixed array, the supervisor's heap stays flat
# the supervisor's figures: a list, not a map (a map's keys would be interned names, on
# the heap the agent is measured in, ``main.build``)
_MIN_FREE = const(0)
_MAX_ALLOC = const(1)
_N = const(2)
_EVERY = const(3)
_ENDED = const(4)
_AT_STOP = const(5)


def _sample(stats, alloc, used):
    """Keep ``used``; when the array is full, keep every other sample and halve the rate."""
    n = stats[_N]
    if n == _SAMPLES:
        for i in range(_SAMPLES // 2):
            alloc[i] = alloc[2 * i]
        n = _SAMPLES // 2
        stats[_EVERY] *= 2
    alloc[n] = used
    stats[_N] = n + 1


def _counters(agent, t):
    return [t, agent.batches_signed, agent.published]


async def supervise(agent, stop, stats, alloc, marks):
    task = asyncio.create_task(agent.run())
    start = time.ticks_ms()
    window = stop.get("window")
    tick = 0
    due = False  # a heap sample is due (``_sample``): taken at the first tick the link is idle
    while True:
        await asyncio.sleep_ms(50)
        gc.collect()
        free = gc.mem_free()
        used = gc.mem_alloc()
        if free < stats[_MIN_FREE]:
            stats[_MIN_FREE] = free
        if used > stats[_MAX_ALLOC]:
            stats[_MAX_ALLOC] = used
        tick += 1
        if tick % stats[_EVERY] == 0:  # about once a second: heap in use after collection
            due = True
        if due and not agent.link.sending():
            # what stays on the heap, not a message on its way out (a batch or a status):
            # a status being sent (its signed chunks and the suspended frames of
            # publish_status, Link.publish, Link.flush, send: 1.4-1.5 KiB here) is live at
            # a collection in this task. The status interval and this sampling are both
            # about a second in the soak, so samples could land in that send for many
            # seconds in a row and then not: a flat heap looked like two levels 1.4 KiB
            # apart. The peaks above count every tick, sends included.
            _sample(stats, alloc, used)
            due = False
        t = time.ticks_diff(time.ticks_ms(), start)
        done = "batches" in stop and agent.batches_signed >= stop["batches"] \
            and agent.store.count == 0
        if "seconds" in stop and t > stop["seconds"] * 1000:
            done = True
        if "file" in stop and tick % 20 == 0 and (agent.store.count == 0
                                                  or not stop.get("drain", True)):
            try:  # the test's signal (it created the file), once every batch is acknowledged
                os.stat(stop["file"])
                done = True
            except OSError:
                pass
        if window:
            if not marks and agent.link.connects and t >= window["warmup_ms"]:
                marks.append(_counters(agent, t))
            elif len(marks) == 1 and t >= marks[0][0] + window["length_ms"]:
                marks.append(_counters(agent, t))
                done = True
        if task.done():  # the agent ended (its error is printed): report, fail at once
            stats[_ENDED] = True
            done = True
        if done:
            # what held at the stop condition: the sampler may seal one more batch while
            # the cancellation below propagates, and that one is not part of the run
            # (``fw_harness.AT_STOP_KEYS``)
            stats[_AT_STOP] = [agent.batches_signed, agent.writer.seq, agent.store.count,
                               agent.published, agent.readings_total, agent.records.count]
            break
    task.cancel()
    await asyncio.sleep_ms(10)


_BOARD = []  # the test's keys, then the board the boot made with them (``Board``)


def run(path):
    from cityedge_fw import main

    with open(path) as f:
        test = json.load(f)
    for key in list(test):  # only the test's own keys stay on the heap
        if key not in ("stop", "clock", "fail_every", "sensors", "device"):
            del test[key]
    stop = test.pop("stop")
    root = os.getenv("CITYEDGE_FLASH")

    _BOARD.append(test)
    # without CITYEDGE_FLASH (an older setup): the one file is the device's configuration
    main.main(root=root or "/", config_file=None if root else path, board_class=Board,
              run_agent=lambda agent: supervised(agent, stop), reset=_reset)


def _reset():
    sys.exit(0)  # a board resets; the unix port's process ends (the test boots it again)


def _qstr_info():
    """One line ``qstr pool: n_pool=P, n_qstr=N, ...`` (``fw_harness.qstr_pools`` reads it):
    the interned names' pools. A pool that grows while the agent runs needs one block
    twice the last pool's size (7.5 KiB for the sixth) in a heap streaming has cut up."""
    import micropython

    micropython.qstr_info()
    sys.stdout.write("\n")


def supervised(agent, stop):
    import cityedge_fw

    cityedge_fw.unload("cityedge_fw.main")  # boot-only, as on a board after boot
    board = _BOARD[0]
    _BOARD.append(agent)  # for ``Board.reset``
    gc.collect()
    _qstr_info()  # the names interned at boot: the run must intern none (no pool grows)
    boot_alloc = gc.mem_alloc()
    stats = [gc.mem_free(), boot_alloc, 0, 20, False, None]
    alloc = array.array("I", bytes(4 * _SAMPLES))
    marks = []
    asyncio.run(supervise(agent, stop, stats, alloc, marks))
    gc.collect()
    # in the order of ``fw_harness.RESULT_KEYS``
    result = [
        agent.batches_signed, agent.published, agent.writer.seq, agent.store.count,
        agent.readings_total, agent.drops_total, agent.sensor_faults, agent.link.connects,
        board.fed, stats[_MIN_FREE], gc.mem_free(), gc.mem_alloc(), agent.last_error or "",
        agent.link.last_error or "", list(alloc[:stats[_N]]), stats[_MAX_ALLOC], marks,
        boot_alloc, agent.sim_ms() // 1000, agent.boot, agent.commands_accepted,
        agent.mem_errors, agent.records.count, agent.cfg["batch_readings"],
        gc.mem_free() + gc.mem_alloc(), stats[_AT_STOP]]
    _qstr_info()
    # written as it is encoded: one string of the whole result needs a block a fragmented
    # heap may no longer have
    sys.stdout.write("RESULT ")
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    if stats[_ENDED]:
        sys.exit(1)  # the agent runs until stopped: ending by itself is a failure


if os.getenv("CE_CONFIG"):  # a test that drives the boot itself sets none
    run(os.getenv("CE_CONFIG"))
