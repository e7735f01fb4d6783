"""The gateway service running for a test: ``Gateway.run`` on its own event loop in a
thread, built from a TOML as ``cityedge gateway run`` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import traceback
from pathlib import Path

from cityedge_gateway.config import load_config
from cityedge_gateway.service import Gateway


class RunningGateway:
    """``Gateway.run`` on its own event loop in a thread, stopped by cancelling it."""

    def __init__(self, config: Path) -> None:
        self.gw = Gateway(load_config(config))
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self.ready.wait(20), "the gateway did not start"

    def _main(self) -> None:
        async def run() -> None:
            up = asyncio.Event()
            self._task = asyncio.current_task()  # type: ignore[assignment]
            waiter = asyncio.create_task(up.wait())
            waiter.add_done_callback(lambda _t: self.ready.set())
            await self.gw.run(up)

        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(run())

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)
        if self._thread.is_alive():  # say where it hangs: the loop thread's stack
            frame = sys._current_frames().get(self._thread.ident or 0)
            where = "".join(traceback.format_stack(frame)) if frame else "?"
            tasks = [t.get_stack(limit=3) for t in asyncio.all_tasks(self._loop)]
            raise AssertionError("the gateway did not stop in 30 s:\n%s\ntasks: %s"
                                 % (where, tasks))
