"""Keeps the gateway's tasks running, as the device agent's watchdog keeps the board's.

Every long-running part (each serial input, the committer, the node link, the forwarder,
the status sender) runs under ``Supervisor.keep``: a task that raises or returns is
logged, counted in ``health[name]`` and started again after a jittered, growing wait
(``cityedge_host.backoff``; the wait starts over once a task has run for
``limits.TASK_STABLE_S``). The counts go out in the signed status and in ``/metrics``, so
a part that keeps failing is seen at once, not when the service stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cityedge_host.backoff import Backoff

from . import limits

log = logging.getLogger(__name__)


@dataclass
class TaskHealth:
    running: bool = False
    restarts: int = 0  # times the task ended (crashed or returned) and was started again
    last_error: str = ""


class Supervisor:
    def __init__(self) -> None:
        self.health: dict[str, TaskHealth] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def keep(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``run()`` as task ``name`` for as long as the supervisor lives."""
        self.health[name] = TaskHealth()
        task = asyncio.create_task(self._keep(name, run), name=name)
        self.tasks.append(task)
        return task

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        health = self.health[name]
        backoff = Backoff(limits.TASK_RESTART_MIN_S, limits.TASK_RESTART_MAX_S)
        while True:
            started = time.monotonic()
            health.running = True
            try:
                await run()
                health.last_error = "ended"
                log.error("task %s ended; starting it again", name)
            except asyncio.CancelledError:
                health.running = False
                raise
            except Exception as e:  # a part's fault must not stop the gateway
                health.last_error = ("%s: %s" % (type(e).__name__, e))[:200]
                log.exception("task %s failed; starting it again", name)
            health.running = False
            health.restarts += 1
            if time.monotonic() - started >= limits.TASK_STABLE_S:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def stop(self, grace_s: float = limits.TASK_STOP_GRACE_S) -> list[str]:
        """Cancel every task and wait for them; a task still running ``grace_s`` after
        its cancel (one that waits, in its clean-up, for a peer that does not answer:
        aiomqtt waits for the broker to close after DISCONNECT) is cancelled once more,
        then, after another ``grace_s``, left behind and logged, so that the gateway's
        shutdown never hangs (systemd would kill it mid-commit). Returns the names of
        the tasks left behind."""
        pending = {t for t in self.tasks if not t.done()}
        for attempt in range(2):
            for task in pending:
                task.cancel()
            if not pending:
                break
            _done, pending = await asyncio.wait(pending, timeout=grace_s)
            for task in pending:
                log.warning("task %s still running %.1f s after cancel%s", task.get_name(),
                            grace_s, "; cancelling it again" if attempt == 0 else "; left")
        for task in self.tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failure at shutdown is not "never retrieved"
        left = sorted(t.get_name() for t in pending)
        for name in left:
            self.health[name].last_error = "did not stop"
        return left
