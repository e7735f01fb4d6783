"""The health gate of a release in trial: commit only once the gateway has proven it works.

A start in trial must, within ``[update] trial_deadline_s``, reach the city broker with its
certificate (TLS, the broker's ``require_certificate``) and have a signed batch of its own
acknowledged (PUBACK: the forwarder's ``on_acked``). So that there is always such a batch,
the trial signs a beacon at once: one SenML record ``update/sequence`` whose value is the
release's sequence, committed to the buffer like any reading (with a backlog, the oldest
batches go first, and any own batch acknowledged counts: it went out through the new
release's forwarder, over its TLS session).

Healthy: ``Installer.commit()``. Not within the deadline: ``Installer.roll_back(reason)``
where the reason says what was missing (the broker never reached, and its last error; or
reached but nothing acknowledged); the gateway then exits with ``EXIT_ROLLED_BACK`` and
systemd starts the previous release.
"""

from __future__ import annotations

import asyncio
import logging

from .forwarder import ForwarderStats
from .ota_install import Installer
from .ota_state import UpdateRecord
from .store import Stored

log = logging.getLogger(__name__)

BEACON_NAME = "update/sequence"  # the trial's beacon reading (value: the release's sequence)


class TrialGate:
    """Waits for the first own batch the broker acknowledges, or the deadline."""

    def __init__(self, installer: Installer, device: str, deadline_s: float) -> None:
        self.installer = installer
        self.device = device
        self.deadline_s = deadline_s
        self.healthy = asyncio.Event()

    def on_acked(self, row: Stored) -> None:
        """The forwarder's hook: a batch was acknowledged by the broker."""
        if row.device == self.device:
            self.healthy.set()

    async def decide(self, stats: ForwarderStats | None) -> UpdateRecord:
        """Commit when healthy, roll back at the deadline; returns the new record."""
        try:
            await asyncio.wait_for(self.healthy.wait(), self.deadline_s)
        except TimeoutError:
            reason = self._why(stats)
            log.error("release in trial is not healthy after %.0f s: %s; rolling back",
                      self.deadline_s, reason)
            return await asyncio.to_thread(self.installer.roll_back, reason)
        log.info("release in trial is healthy: committing")
        return await asyncio.to_thread(self.installer.commit)

    def _why(self, stats: ForwarderStats | None) -> str:
        if stats is None:
            return "no broker configured: no batch can be acknowledged"
        if not stats.connects:
            return "no health within %.0f s: the broker was never reached (%s)" % (
                self.deadline_s, stats.last_error or "no error reported")
        return ("no health within %.0f s: connected %d times, but no signed batch was "
                "acknowledged" % (self.deadline_s, stats.connects))
