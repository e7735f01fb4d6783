"""``cityedge fleet serve``: the API under uvicorn, plus (by default) an ingest worker, the
broker reconciler (grants and CRL kept in step with the registry: ``broker_sync``) and the
command publisher (``command_publisher``) and the key campaigns' and renewal's runner
(``campaign_runner``) in background threads of the same process.

At start it says what it runs against (``describe_start``: the mode, the database with its
password masked, the CA directory, the broker devices are told and the one the ingest
uses): a fleet started with the wrong settings shows it in its first lines."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_fleet import campaign_runner, revocation
from cityedge_fleet.app import create_app
from cityedge_fleet.broker_rabbitmq import INGEST_QUEUE
from cityedge_fleet.broker_sync import BrokerAccess, Reconciler
from cityedge_fleet.ca import CaError, CertificateAuthority, load_current
from cityedge_fleet.ca_custody import custody_of
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.command_publisher import CommandPublisher
from cityedge_fleet.config import Settings
from cityedge_fleet.db import describe_database
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_transport import ingest_worker
from cityedge_host import sd_notify

log = logging.getLogger(__name__)
CRL_CHECK_EVERY_S = 3600.0  # seconds between checks whether the CRL needs re-signing


def refresh_crl(settings: Settings) -> Callable[[Session], None]:
    """One round's CRL upkeep: re-signed when due or when the registry changed it."""

    def refresh(session: Session) -> None:
        try:
            ca = CertificateAuthority(settings.ca_dir, custody_of(settings))
        except CaError as e:
            log.warning("CRL not refreshed: %s", e)
            return
        if revocation.refresh_if_due(session, ca, settings):
            log.info("CRL re-signed")

    return refresh


def start_reconciler(settings: Settings, engine: Engine, access: BrokerAccess) -> Reconciler:
    every = min(settings.limits.broker_sync_every_s, CRL_CHECK_EVERY_S)
    return Reconciler(access, lambda: Session(engine), every,
                      also=refresh_crl(settings)).start()


def ingestor_for(settings: Settings, engine: Engine, reconciler: Reconciler,
                 publisher: CommandPublisher | None = None) -> Ingestor:
    """The ingest of ``fleet serve``: a device it quarantines wakes the reconciler, which
    cuts it at the broker and suspends its certificates at once, not a round later; a
    device back after a silence wakes the command publisher, which sends it what it has
    not answered at once."""
    return Ingestor(engine, settings, on_quarantine=lambda _devices: reconciler.wake(),
                    on_return=publisher.wake if publisher is not None else None)


def start_publisher(settings: Settings, engine: Engine) -> CommandPublisher | None:
    """The command publisher, unless turned off or without its certificate (then commands
    are queued and wait: said in the log)."""
    if not settings.commands_with_serve:
        return None
    if settings.commands_cert_file is None or settings.commands_key_file is None:
        log.warning("commands are queued but not published: no CITYEDGE_COMMANDS_CERT_FILE "
                    "and CITYEDGE_COMMANDS_KEY_FILE (the fleet-commands certificate)")
        return None
    return CommandPublisher(engine, settings).start()


def start_campaign_runner(settings: Settings, engine: Engine,
                          publisher: CommandPublisher | None) -> CampaignRunner | None:
    """Key campaigns and renewal (``campaign_runner``), unless turned off."""
    if not settings.commands_with_serve:
        return None
    return campaign_runner.start_for_serve(settings, engine,
                                           publisher.wake if publisher else None)


def freeze_startup_objects() -> None:
    """Keep the objects made at start (modules, app, models: >100,000) out of the garbage
    collector's full passes: each would walk them all, a pause of ~70 ms on a small machine
    that lands on whichever request is running (the registry's p99)."""
    gc.collect()
    gc.freeze()


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's proxy-header options from ``CITYEDGE_TRUSTED_PROXIES``: X-Forwarded-For is
    believed only from those addresses (uvicorn's own default trusts 127.0.0.1, so any
    local process, or a proxy we were not told about, could name any client)."""
    trusted = [str(net) for net in settings.trusted_proxies]
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted}


class NotifyingServer(uvicorn.Server):
    """uvicorn's server that speaks systemd's ``Type=notify``: READY once it listens,
    watchdog pings from its own event loop while the background threads live (a hung
    loop or a dead reconciler stops them: systemd restarts the service), STOPPING when
    it shuts down. Outside systemd it is uvicorn's server."""

    def __init__(self, config: uvicorn.Config, healthy: Callable[[], bool]) -> None:
        super().__init__(config)
        self.healthy = healthy
        self._pinger: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            sd_notify.notify("READY=1\nSTATUS=fleet API on %s:%d"
                             % (self.config.host, self.config.port))
            self._pinger = asyncio.create_task(sd_notify.watchdog(self.healthy))

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        sd_notify.notify("STOPPING=1")
        if self._pinger is not None:
            self._pinger.cancel()
        await super().shutdown(sockets)


def describe_start(settings: Settings, *, ingest: bool) -> list[str]:
    """What a starting ``fleet serve`` / ``fleet ingest`` uses, one item a line."""
    lines = ["mode %s" % settings.mode,
             "database %s" % describe_database(settings.database_url),
             "CA directory %s" % settings.ca_dir.absolute(),
             "broker for devices %s" % settings.broker_url]
    if ingest and settings.broker_engine == "rabbitmq":  # ingest_amqp: never the MQTT port
        lines.append("ingest from the RabbitMQ queue %s (AMQP over TLS: %s; the first that "
                     "answers)" % (INGEST_QUEUE, ", ".join(
                         n.strip() for n in settings.ingest_amqp_nodes.split(",")
                         if n.strip())))
    elif ingest:
        how = ("plain subscriptions" if settings.ingest_subscription == "plain"
               else "share group %s" % settings.ingest_share_group)
        lines.append("ingest from mqtts://%s:%d (%s)" % (
            settings.mqtt_host, settings.mqtt_port, how))
    else:
        lines.append("ingest off")
    return lines


def say_start(command: str, settings: Settings, *, ingest: bool) -> None:
    for line in describe_start(settings, ingest=ingest):
        print("cityedge %s: %s" % (command, line), file=sys.stderr, flush=True)


def serve(settings: Settings, host: str, port: int, *, init_db: bool = False) -> None:
    say_start("fleet serve", settings, ingest=settings.ingest_with_serve)
    if settings.mode == "production":  # the CA key opened once before anything starts: a
        try:  # key in clear, a wrong passphrase or PIN stops the start (ca_custody)
            load_current(settings.ca_dir, custody_of(settings))
        except CaError as e:
            raise ValueError(str(e)) from e
    app = create_app(settings, init_db=init_db)
    reconciler = start_reconciler(settings, app.state.engine, app.state.broker_access)
    app.state.reconciler = reconciler
    publisher = start_publisher(settings, app.state.engine)
    app.state.command_publisher = publisher
    runner = start_campaign_runner(settings, app.state.engine, publisher)
    app.state.campaign_runner = runner
    worker = None
    if settings.ingest_with_serve:
        worker = ingest_worker(ingestor_for(settings, app.state.engine, reconciler,
                                            publisher), settings).start()
        app.state.ingest_worker = worker  # its verdict counts go to /metrics
    freeze_startup_objects()
    try:
        config = uvicorn.Config(app, host=host, port=port, **proxy_options(settings))
        NotifyingServer(config, lambda: reconciler.alive() and (
            worker is None or worker.alive())).run()
    finally:
        reconciler.stop()
        if runner is not None:
            runner.stop()
        if publisher is not None:
            publisher.stop()
        if worker is not None:
            worker.stop()
