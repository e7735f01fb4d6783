"""The loop in ``fleet serve`` that moves key campaigns, OTA campaigns and renewal along:
every ``CampaignLimits.runner_every_s`` each running campaign gets a round
(``campaign_store.advance``, ``ota_store.advance``; one transaction per campaign, its row
locked so replicas take turns), and every ``RenewalLimits.every_s`` a renewal round
(``renewal.renewal_round``). Rotations and updates it starts wake the command publisher,
so their commands go out at once.
A round's fault is logged and the next round tries again; nothing here talks to the
broker."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_fleet import campaign_store, ota_store, renewal
from cityedge_fleet.campaign import LIMITS, CampaignLimits
from cityedge_fleet.command_key import KeyFile
from cityedge_fleet.config import Settings
from cityedge_fleet.models import utcnow
from cityedge_host.crypto import EcSigner

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    campaigns: dict[int, str] = field(default_factory=dict)  # id -> state after the round
    ota_campaigns: dict[int, str] = field(default_factory=dict)  # id -> state (OTA)
    started: int = 0  # rotations and updates started by campaigns
    renewal: renewal.RoundResult | None = None


class CampaignRunner:
    def __init__(self, engine: Engine, settings: Settings, signer: EcSigner | KeyFile, *,
                 wake_publisher: Callable[[], None] | None = None,
                 clim: CampaignLimits = LIMITS, rlim: renewal.RenewalLimits = renewal.LIMITS,
                 renew: bool = True) -> None:
        self.engine = engine
        self.settings = settings
        self._key = signer  # a KeyFile follows a command-key switch without a restart
        self.wake_publisher = wake_publisher
        self.clim = clim
        self.rlim = rlim
        self.renew = renew
        self._next_renewal = 0.0  # monotonic time of the next renewal round
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def signer(self) -> EcSigner:
        key = self._key
        return key.current() if isinstance(key, KeyFile) else key

    def round(self, now: dt.datetime | None = None, *, renewal_due: bool | None = None
              ) -> RoundResult:
        """Advance every running campaign; a renewal round when due (or told)."""
        now = now or utcnow()
        out = RoundResult()
        with Session(self.engine) as session:
            ids = campaign_store.live_ids(session)
        for cid in ids:
            with Session(self.engine) as session:
                plan = campaign_store.advance(session, cid, signer=self.signer,
                                              lim=self.settings.limits, now=now,
                                              clim=self.clim)
                session.commit()
            out.campaigns[cid] = str(plan.state)
            out.started += len(plan.start)
        with Session(self.engine) as session:
            ota_ids = ota_store.live_ids(session)
        for oid in ota_ids:
            with Session(self.engine) as session:
                oplan = ota_store.advance(session, oid, signer=self.signer,
                                          settings=self.settings, now=now)
                session.commit()
            out.ota_campaigns[oid] = str(oplan.state)
            out.started += len(oplan.start)
        if renewal_due is None:
            renewal_due = self.renew and time.monotonic() >= self._next_renewal
        if renewal_due:
            self._next_renewal = time.monotonic() + self.rlim.every_s
            with Session(self.engine) as session:
                out.renewal = renewal.renewal_round(session, signer=self.signer,
                                                    lim=self.settings.limits, now=now,
                                                    rl=self.rlim)
                session.commit()
        started = out.started + (len(out.renewal.started) if out.renewal else 0)
        if started and self.wake_publisher is not None:
            self.wake_publisher()
        return out

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # a database fault: the next round tries again
                log.exception("campaign round failed")
            self._wake.wait(self.clim.runner_every_s)
            self._wake.clear()

    def start(self) -> CampaignRunner:
        self._thread = threading.Thread(target=self._loop, name="campaign-runner",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)


def start_for_serve(settings: Settings, engine: Engine,
                    wake_publisher: Callable[[], None] | None) -> CampaignRunner | None:
    """``fleet serve``'s runner, unless there is no command key to sign rotations with
    (then campaigns and renewal wait: said in the log)."""
    from cityedge_core.errors import LocalError
    from cityedge_fleet import command_key

    try:
        signer = command_key.key_file(settings)
    except LocalError as e:
        log.warning("key campaigns and renewal do not run: %s", e)
        return None
    return CampaignRunner(engine, settings, signer, wake_publisher=wake_publisher).start()
