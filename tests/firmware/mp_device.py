"""A test device for the MicroPython unix port: the real boot and agent on a stand-in board.

``CITYEDGE_FLASH=DIR CE_CONFIG=TEST.json python -m cityedge.romfs --image IMAGE -X
heapsize=64k -c "import mp_device"`` (compiled to .mpy with the firmware, in its ROMFS
image: ``fw_harness.device_argv``/``device_env``) boots as a board boots
(``cityedge_fw.main.main``: ``config.json`` on the flash root ``DIR``, ``config.load``, the
TLS context, keys, settings, the board, the agent; the same order and code as
``main.boot()``), with this stand-in board class instead of the port's HAL board, and runs
the agent under a supervisor until ``stop`` in ``TEST.json`` (the test's own keys) is met:
``{"batches": N}`` (N batches signed and every stored batch acknowledged) and/or
``{"seconds": S}`` and/or ``{"window": {"warmup_ms": W, "length_ms": L}}`` (the bench:
once connected and W ms in, the counters are marked, and again L ms later). It then
prints one line ``RESULT <json>`` with counters and heap use, and exits with status 1 if
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
        # only what the board needs: the parsed configuration is not kept on the heap
        self.device = cfg["device"]
        self.clock = cfg.get("clock", True)
        self.fail_every = cfg.get("fail_every", 0)
        self.count = cfg.get("sensors", 1)
        self.fed = 0

    def device_id(self):
        return self.device

    def wdt_feed(self):
        self.fed += 1

    def free_heap(self):
        return gc.mem_free()

    def unix_time(self):
        return int(time.time()) if self.clock else None

    def sensors(self, config):
        return [Sensor("s%d" % (i + 1), self.fail_every) for i in range(self.count)]


_SAMPLES = 64  # heap samples kept: a fixed array, so the supervisor's own heap stays flat


def _sample(stats, used):
    """Keep ``used``; when the array is full, keep every other sample and halve the rate."""
    buf = stats["alloc"]
    n = stats["n"]
    if n == _SAMPLES:
        for i in range(_SAMPLES // 2):
            buf[i] = buf[2 * i]
        n = _SAMPLES // 2
        stats["every"] *= 2
    buf[n] = used
    stats["n"] = n + 1


def _counters(agent, t):
    return [t, agent.batches_signed, agent.published]


async def supervise(agent, stop, stats):
    task = asyncio.create_task(agent.run())
    start = time.ticks_ms()
    window = stop.get("window")
    marks = stats["marks"]
    tick = 0
    while True:
        await asyncio.sleep_ms(50)
        gc.collect()
        free = gc.mem_free()
        used = gc.mem_alloc()
        if free < stats["min_free"]:
            stats["min_free"] = free
        if used > stats["max_alloc"]:
            stats["max_alloc"] = used
        tick += 1
        if tick % stats["every"] == 0:  # about once a second: heap in use after collection
            _sample(stats, used)
        t = time.ticks_diff(time.ticks_ms(), start)
        done = "batches" in stop and agent.batches_signed >= stop["batches"] \
            and agent.store.count == 0
        if "seconds" in stop and t > stop["seconds"] * 1000:
            done = True
        if window:
            if not marks and agent.link.connects and t >= window["warmup_ms"]:
                marks.append(_counters(agent, t))
            elif len(marks) == 1 and t >= marks[0][0] + window["length_ms"]:
                marks.append(_counters(agent, t))
                done = True
        if task.done():  # the agent ended (its error is printed): report, fail at once
            stats["ended"] = True
            done = True
        if done:
            # what held at the stop condition: the sampler may seal one more batch while
            # the cancellation below propagates, and that one is not part of the run
            stats["at_stop"] = {"batches": agent.batches_signed, "seq": agent.writer.seq,
                                "stored": agent.store.count, "published": agent.published,
                                "readings": agent.readings_total,
                                "pending": agent.records.count}
            break
    task.cancel()
    await asyncio.sleep_ms(10)


_TEST_KEYS = ("stop", "clock", "fail_every", "sensors", "device")
_BOARD = []  # the board the boot made (the result reports its watchdog feeds)


def run(path):
    from cityedge_fw import main

    with open(path) as f:
        test = json.load(f)
    for key in list(test):  # only the test's own keys stay on the heap
        if key not in _TEST_KEYS:
            del test[key]
    stop = test.pop("stop")
    root = os.getenv("CITYEDGE_FLASH")

    class StandIn(Board):
        def __init__(self, cfg):
            Board.__init__(self, test)
            _BOARD.append(self)

    # without CITYEDGE_FLASH (an older setup): the one file is the device's configuration
    main.main(root=root or "/", config_file=None if root else path, board_class=StandIn,
              run_agent=lambda agent: supervised(agent, stop))


def supervised(agent, stop):
    import cityedge_fw

    cityedge_fw.unload("cityedge_fw.main")  # boot-only, as on a board after boot
    board = _BOARD[0]
    gc.collect()
    stats = {"min_free": gc.mem_free(), "max_alloc": gc.mem_alloc(),
             "alloc": array.array("I", bytes(4 * _SAMPLES)), "n": 0, "every": 20,
             "boot_alloc": gc.mem_alloc(), "marks": []}
    asyncio.run(supervise(agent, stop, stats))
    gc.collect()
    result = {
        "batches": agent.batches_signed, "published": agent.published,
        "seq": agent.writer.seq, "stored": agent.store.count, "readings": agent.readings_total,
        "drops": agent.drops_total, "faults": agent.sensor_faults,
        "connects": agent.link.connects, "fed": board.fed, "min_free": stats["min_free"],
        "free_end": gc.mem_free(), "alloc_end": gc.mem_alloc(),
        "last_error": agent.last_error or "",
        "link_error": agent.link.last_error or "",
        "alloc": list(stats["alloc"][:stats["n"]]),
        "max_alloc": stats["max_alloc"], "marks": stats["marks"],
        "boot_alloc": stats["boot_alloc"], "sim_s": agent.sim_ms() // 1000,
        "boot": agent.boot, "commands": agent.commands_accepted,
        "mem_errors": agent.mem_errors, "pending": agent.records.count,
        "batch_readings": agent.cfg["batch_readings"],
        "heap": gc.mem_free() + gc.mem_alloc()}
    result.update(stats.get("at_stop", {}))
    # written as it is encoded: one string of the whole result needs a block a fragmented
    # heap may no longer have
    sys.stdout.write("RESULT ")
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    if stats.get("ended"):
        sys.exit(1)  # the agent runs until stopped: ending by itself is a failure


run(os.getenv("CE_CONFIG"))
