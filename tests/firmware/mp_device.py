"""A test device for the MicroPython unix port: the real agent on a stand-in board.

``CE_CONFIG=CONFIG.json python -m cityedge.romfs --image IMAGE -X heapsize=64k -c "import
mp_device"`` (compiled to .mpy with the firmware, in its ROMFS image:
``fw_harness.device_argv``) builds the agent with ``cityedge_fw.main.build`` and runs it
until ``stop`` in the config is met:
``{"batches": N}`` (N batches signed and every stored batch acknowledged) and/or
``{"seconds": S}``. It then prints one line ``RESULT <json>`` with counters and heap use,
and exits with status 1 if the agent ended by itself (a task failed) before that.

The stand-in board is test code: sensors that return a counter, no watchdog hardware.
"""

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
        return [(self.name + "_t", "Cel", 20 + self.n % 7), (self.name + "_h", "%RH", 40)]


class Board:
    name = "mp-test"

    def __init__(self, cfg):
        # only what the board needs: the parsed configuration is not kept on the heap
        self.device = cfg["device"]
        self.clock = cfg.get("clock", True)
        self.fail_every = cfg.get("fail_every", 0)
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
        return [Sensor("s1", self.fail_every)]


async def supervise(agent, stop, stats):
    task = asyncio.create_task(agent.run())
    start = time.ticks_ms()
    tick = 0
    while True:
        await asyncio.sleep_ms(50)
        gc.collect()
        free = gc.mem_free()
        if free < stats["min_free"]:
            stats["min_free"] = free
        tick += 1
        if tick % 20 == 0:  # about once a second: heap in use after a collection
            stats["alloc"].append(gc.mem_alloc())
        done = "batches" in stop and agent.batches_signed >= stop["batches"] \
            and agent.store.count == 0
        if "seconds" in stop and time.ticks_diff(time.ticks_ms(), start) > stop["seconds"] * 1000:
            done = True
        if task.done():  # the agent ended (its error is printed): report, fail at once
            stats["ended"] = True
            done = True
        if done:
            # what held at the stop condition: the sampler may seal one more batch while
            # the cancellation below propagates, and that one is not part of the run
            stats["at_stop"] = {"batches": agent.batches_signed, "seq": agent.writer.seq,
                                "stored": agent.store.count, "published": agent.published}
            break
    task.cancel()
    await asyncio.sleep_ms(10)


def unload(name):
    """Take a boot-only module off the heap, as a board would after boot: out of
    ``sys.modules`` and out of its package (the last references to it)."""
    sys.modules.pop(name, None)
    pkg, _, leaf = name.rpartition(".")
    if pkg in sys.modules:
        sys.modules[pkg].__dict__.pop(leaf, None)


def run(path):
    from cityedge_fw import main

    with open(path) as f:
        cfg = json.load(f)
    board = Board(cfg)
    agent = main.build(cfg, board)
    stop = cfg["stop"]
    del cfg, main
    unload("cityedge_fw.main")
    gc.collect()
    stats = {"min_free": gc.mem_free(), "alloc": [], "boot_alloc": gc.mem_alloc()}
    asyncio.run(supervise(agent, stop, stats))
    gc.collect()
    result = {
        "batches": agent.batches_signed, "published": agent.published,
        "seq": agent.writer.seq, "stored": agent.store.count, "readings": agent.readings_total,
        "drops": agent.drops_total, "faults": agent.sensor_faults,
        "connects": agent.link.connects, "fed": board.fed, "min_free": stats["min_free"],
        "free_end": gc.mem_free(), "alloc_end": gc.mem_alloc(),
        "last_error": agent.last_error or "",
        "link_error": agent.link.last_error or "", "alloc": stats["alloc"],
        "boot_alloc": stats["boot_alloc"], "sim_s": agent.sim_ms() // 1000,
        "heap": gc.mem_free() + gc.mem_alloc()}
    result.update(stats.get("at_stop", {}))
    print("RESULT " + json.dumps(result))
    if stats.get("ended"):
        sys.exit(1)  # the agent runs until stopped: ending by itself is a failure


run(os.getenv("CE_CONFIG"))
