"""The gateway service: wires config, key, store, inputs, relay, forwarder and metrics.

Every part runs as a supervised task (``supervisor``): one that fails is started again
and counted, never left dead until shutdown. Readings from the serial inputs are grouped
into record lists of ``batch_readings``; every ``limits.COMMIT_INTERVAL_S`` the full
lists (and a partial one older than ``batch_max_age_s``) are signed and committed in one
durable transaction (group commit: one fsync for many batches), then the forwarder is
woken. Everything runs on one asyncio loop in one thread, so the SQLite connection is
never shared between threads.

The signing key must be a file only its owner can read (mode 0600 or stricter); the
service refuses to start otherwise. The key is never logged or printed.

Fleet commands: with ``fleet_keys`` in its config (its trust store) the gateway answers
signed commands on ``down/cmd`` through ``cityedge_host.command_responder`` (the core's
gate, answers signed with the gateway's key, kept in the buffer for repeats). It knows
``status`` (a signed status now) and the key rotation's ``rotate``, ``install-cert`` and
``erase-key`` (``rotation_device``), and ``trust-update`` (``cityedge_host.fleet_trust``:
a statement of the fleet's offline root, checked against ``root_cert``, replaces the
fleet keys it obeys; the installed statement is kept in the buffer's state and wins over
``fleet_keys`` from then on; ``cityedge gateway install-trust`` installs the enrollment
answer's statement before the first start, ``enroll_trust``; at each start the installed
statement is checked again and a tampered or rolled-back one makes the gateway obey no
fleet command, reported in its status and metrics), and with ``[update]`` the OTA
campaign's ``update`` (below); any other command is answered ``refused``.

Updates from the fleet: ``update`` is checked, downloaded and installed into trial by
``ota_command.take_update`` (in a thread: readings and the link go on meanwhile); a refusal
is answered ``refused`` with the manifest check's reason, a failed fetch or install
``failed``. Once the new release is switched in, the command is kept *taken, answered
later* (``command_responder.Later``, durably in the buffer's state: the fleet's repeats are
neither run again nor answered) and the gateway exits with ``EXIT_RESTART``; systemd
starts the new release. Its trial decides, and the answer follows the outcome, signed by
whichever release learns it: the new one right after its commit (``ok``, data ``{"state":
"committed", ...}``), the previous one at its start after a rollback (``failed``, data
``{"state": "rolled-back"}``, the reason as detail) — also when the boot guard rolled a
crashing release back. The answer is kept for repeats and published until the broker
acknowledges it.

Identity: with ``[gateway] identity_dir`` the key (TLS and signing) and certificate come
from the key slots there (``key_slots``; seeded on the first start from ``[broker]
cert_file``/``key_file``), and a rotation switches both while running: the store's
``BatchWriter`` signs the next batch with the new key (seq and previous hash go on), the
responder and the status sign with it, and the forwarder reconnects with the new
certificate. Without it the key files of the config are used as they are, and rotation
commands are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cityedge_core import command, senml, topics, update_manifest
from cityedge_host import sd_notify
from cityedge_host.command_responder import CommandResponder, Done, Later, Refuse
from cityedge_host.crypto import KeyFileError, load_signer, load_verifier
from cityedge_host.fleet_trust import FleetTrust

from . import limits
from .buffer_lock import BufferLock
from .config import BrokerConfig, GatewayConfig
from .enroll_trust import version_mark
from .forwarder import Forwarder
from .key_slots import Identity, KeySlots
from .metrics import metrics_text, registry_for
from .metrics_http import serve_metrics
from .node_link import NodeListener
from .ota_command import UpdateRefused, download_limits, take_update
from .ota_health import BEACON_NAME, TrialGate
from .ota_install import (
    CURRENT,
    EXIT_RESTART,
    EXIT_ROLLED_BACK,
    Installer,
    ReleaseBuilder,
    build_copy,
    build_venv,
)
from .ota_state import BUSY, COMMITTED, FAILED, ROLLED_BACK, TRIAL, UpdateRecord
from .readings import Reading
from .relay import NodeRelay
from .rotation_device import GatewayRotation
from .serial_input import SerialInput
from .status import sign_status
from .store import CommandState, Store
from .supervisor import Supervisor

log = logging.getLogger(__name__)


def check_private_file(path: Path) -> None:
    """Refuse a private key that group or others can read or write."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise KeyFileError("cannot read key %s: %s" % (path, e.strerror)) from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            "key %s has mode %03o: group or others may read it; run `chmod 600 %s`"
            % (path, stat.S_IMODE(mode), path)
        )


def open_identity(cfg: GatewayConfig, broker: BrokerConfig) -> tuple[KeySlots, Identity]:
    """The key slots of ``cfg.identity_dir`` and the identity in use (seeded from the
    broker's cert_file/key_file on the first start)."""
    assert cfg.identity_dir is not None
    slots = KeySlots(cfg.identity_dir, cfg.device)
    if slots.current_slot() is None:
        check_private_file(broker.key_file)
        if cfg.key_file != broker.key_file and cfg.key_file.is_file():
            check_private_file(cfg.key_file)
            if load_signer(cfg.key_file).kid != load_signer(broker.key_file).kid:
                raise KeyFileError(
                    "gateway.key_file and broker.key_file hold different keys; with "
                    "identity_dir one key signs and connects: use the key of broker.cert_file")
    ident = slots.open(broker.key_file, broker.cert_file)
    slots.forget_source(cfg.key_file)
    check_private_file(ident.key_file)
    return slots, ident


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        # one process per buffer, taken before anything is written (the key slots, the
        # buffer): another gateway or `install-trust` on it is ``BufferBusy``; held until
        # ``run`` closes the store, released here if the gateway cannot be built
        lock = BufferLock(cfg.store_path)
        try:
            self._build(cfg, lock)
        except BaseException:
            if hasattr(self, "store"):
                self.store.close()
            lock.release()
            raise

    def _build(self, cfg: GatewayConfig, lock: BufferLock) -> None:
        self.cfg = cfg
        broker = cfg.broker
        self.slots: KeySlots | None = None
        self.identity: Identity | None = None
        if cfg.identity_dir is not None and broker is not None:
            self.slots, self.identity = open_identity(cfg, broker)
            self.signer = self.identity.signer
            broker = replace(broker, cert_file=self.identity.cert_file,
                             key_file=self.identity.key_file)
        else:
            check_private_file(cfg.key_file)
            if broker is not None:
                check_private_file(broker.key_file)
            self.signer = load_signer(cfg.key_file)
        if cfg.node_link is not None:
            check_private_file(cfg.node_link.key_file)
        self.store = Store(cfg.store_path, cfg.budget_bytes, lock=lock)
        self.store.attach_writer(cfg.device, self.signer, self.signer.kid)
        nodes = {n.device: load_verifier(n.public_key) for n in cfg.nodes}
        self.relay = NodeRelay(nodes, self.store)
        self.inputs = [SerialInput(s, self.add_readings) for s in cfg.serial]
        self.forwarder = (
            Forwarder(broker, cfg.device, self.store) if broker is not None else None
        )
        self.node_listener = (
            NodeListener(cfg.node_link, cfg.device, self.relay, self._notify)
            if cfg.node_link is not None
            else None
        )
        self.responder: CommandResponder | None = None
        self.fleet_trust: FleetTrust | None = None
        if cfg.fleet_keys and self.forwarder is not None:
            state = CommandState(self.store)
            root = load_verifier(cfg.root_cert) if cfg.root_cert is not None else None
            self.fleet_trust = FleetTrust(map(load_verifier, cfg.fleet_keys), root, state,
                                          lambda: int(time.time()), version_mark(cfg))
            rotating = GatewayRotation(cfg.device, self.slots, self.forwarder,
                                       lambda: self.signer, self.use_identity)
            updating = ({update_manifest.UPDATE: self._update_command}
                        if cfg.update is not None else {})
            self.responder = CommandResponder(cfg.device, self.signer, self.signer.kid,
                                              self.fleet_trust, state,
                                              {"status": self._status_now,
                                               **rotating.handlers(),
                                               **self.fleet_trust.handlers(),
                                               **updating})
            self.forwarder.on_command = self.responder.answer
        self._records: list[dict[int, Any]] = []
        self._first_at = 0.0  # monotonic time of the oldest reading in ``_records``
        self._ready: list[list[dict[int, Any]]] = []
        self.metrics_port = 0  # the bound port once serving
        self.supervisor = Supervisor()  # restarts, counts and reports a task that fails
        # updates (``ota_*``): the installer, its record as of the last look, and an error
        # reading it (reported in the status; the gateway runs on without updates)
        builder: ReleaseBuilder = (build_copy if cfg.update is not None
                                   and cfg.update.build == "copy" else build_venv)
        self.updates = (Installer(cfg.update.root, build=builder,
                                  trial_max_starts=cfg.update.trial_max_starts)
                        if cfg.update is not None else None)
        self.update_record: UpdateRecord | None = None
        self.update_error = ""
        self.exit_code = 0  # what ``cityedge gateway run`` exits with (``EXIT_ROLLED_BACK``)
        self._stop = asyncio.Event()  # set: ``run`` returns (SIGTERM, a restart, a rollback)
        # set as ``run`` returns: an update's download (in a thread) stops at once
        self._download_stop = threading.Event()
        self._results: asyncio.Queue[bytes] = asyncio.Queue()  # answers given later, to send

    def use_identity(self, ident: Identity) -> None:
        """Sign and connect with ``ident`` from now on (a rotation's switch): the chain
        goes on under the new key (the writer keeps its seq and previous hash). The TLS
        context is built first: if the files do not load, nothing has switched."""
        if self.forwarder is not None:
            self.forwarder.use_identity(ident.cert_file, ident.key_file)
        self.identity = ident
        self.signer = ident.signer
        writer = self.store.writer
        assert writer is not None
        writer.signer, writer.kid = ident.signer, ident.kid
        if self.responder is not None:
            self.responder.signer, self.responder.kid = ident.signer, ident.kid
        log.info("now signing and connecting with key %s (slot %d)", ident.kid.hex(),
                 ident.slot)

    def _notify(self) -> None:
        if self.forwarder is not None:
            self.forwarder.notify()

    def add_readings(self, readings: list[Reading], t: float) -> None:
        if not self._records:
            self._first_at = time.monotonic()
        for r in readings:
            self._records.append(r.to_senml(t))
            if len(self._records) >= self.cfg.batch_readings:
                self._ready.append(self._records)
                self._records = []
                self._first_at = time.monotonic()

    def flush(self, force: bool = False) -> int:
        """Sign and commit ready batches (and an old or forced partial one); returns count."""
        if self._records and (
            force or time.monotonic() - self._first_at >= self.cfg.batch_max_age_s
        ):
            self._ready.append(self._records)
            self._records = []
        if not self._ready:
            return 0
        ready = self._ready[: limits.STORE_COMMIT_MAX_BATCHES]
        report = self.store.commit(own=ready)
        del self._ready[: len(ready)]
        if report.own or report.nodes:
            log.warning("buffer full: dropped %s (own) and %s (nodes)", report.own, report.nodes)
        if self.forwarder is not None:
            self.forwarder.notify()
        return len(ready)

    async def _committer(self) -> None:
        while True:
            await asyncio.sleep(limits.COMMIT_INTERVAL_S)
            self.flush()

    async def _status_now(self, args: Any) -> Done:
        """The ``status`` command: a signed status at once."""
        assert self.forwarder is not None
        if not await self.forwarder.publish_status(sign_status(self)):
            raise ConnectionError("the status could not be published")
        return Done("status sent")

    async def _status(self) -> None:
        assert self.forwarder is not None
        while True:  # first status as soon as the link is up, then every interval
            sent = await self.forwarder.publish_status(sign_status(self))
            await asyncio.sleep(limits.STATUS_INTERVAL_S if sent else 1.0)

    async def _update_command(self, args: Any) -> Done | Later:
        """The fleet's ``update``: install into trial, then restart; answered after the
        trial (module docstring)."""
        u = self.cfg.update
        if self.updates is None or u is None or u.release_roots is None:
            raise Refuse("this gateway takes no update command: [update] release_roots "
                         "is not configured")
        broker = self.cfg.broker
        assert broker is not None  # commands come over the broker link
        try:
            rec = await asyncio.to_thread(
                take_update, args, self.updates, roots_file=u.release_roots,
                hw_class=u.hw_class, ca_file=u.ca_file or broker.ca_file,
                bounds=download_limits(u), stop=self._download_stop)
        except UpdateRefused as e:
            raise Refuse(str(e)[:200]) from e
        self.update_record = rec
        log.info("release %s (seq %d) installed in trial: restarting into it",
                 rec.version, rec.sequence)
        self.exit_code = EXIT_RESTART
        if self.forwarder is not None:  # after this command's (absent) answer: stop
            self.forwarder.after_answer = self._stop.set
        else:
            self._stop.set()
        return Later({"sequence": rec.sequence, "version": rec.version})

    def _answer_updates(self) -> None:
        """Answer the ``update`` commands taken before a restart whose release's trial has
        an outcome in the record; queue the answers to be published."""
        rec = self.update_record
        if self.responder is None or rec is None:
            return
        for p in self.responder.pending():
            if p.name != update_manifest.UPDATE:
                continue
            note = p.note if isinstance(p.note, dict) else {}
            data: dict[str, Any]
            if note.get("sequence") != rec.sequence:
                if rec.state in BUSY:
                    continue  # another release is under way: its outcome answers later
                outcome, detail, data = (command.FAILED, "release %s was replaced before "
                                         "its outcome was known" % note.get("version"),
                                         {"state": FAILED})
            elif rec.state == COMMITTED:
                outcome, detail, data = command.OK, "committed", {
                    "state": COMMITTED, "version": rec.version, "sequence": rec.sequence}
            elif rec.state in (ROLLED_BACK, FAILED):
                outcome, detail, data = command.FAILED, rec.reason or rec.state, {
                    "state": rec.state, "version": rec.version, "sequence": rec.sequence}
            else:
                continue  # still in trial: its outcome answers
            log.info("update command %d: answering %s (%s)", p.seq, outcome, rec.state)
            try:
                self._results.put_nowait(self.responder.finish(p.seq, outcome, detail, data))
            except Exception as e:  # the buffer's state: the next start tries again
                self.update_error = ("%s: %s" % (type(e).__name__, e))[:200]
                log.error("the update command's answer could not be kept: %s",
                          self.update_error)

    async def _send_results(self) -> None:
        """Publish the answers given later, each until the broker acknowledges it (a lost
        one is also answered from the kept answers when the fleet sends the command
        again)."""
        assert self.forwarder is not None
        while True:
            signed = await self._results.get()
            while not await self.forwarder.publish_up(topics.RESULT, signed):
                await asyncio.sleep(1.0)

    def _start_updates(self, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """Finish what a stop interrupted; in trial, start the health gate."""
        if self.updates is None:
            return None
        try:
            self.update_record = rec = self.updates.recover()
        except Exception as e:  # a damaged state file must not stop the readings
            self.update_error = ("%s: %s" % (type(e).__name__, e))[:200]
            log.error("update state unreadable, updates are off: %s", self.update_error)
            return None
        if rec.state != TRIAL or self.updates.link(CURRENT) != rec.version:
            return None  # (recover() points current at a release in trial, or rolls back)
        assert self.cfg.update is not None
        gate = TrialGate(self.updates, self.cfg.device, self.cfg.update.trial_deadline_s)
        if self.forwarder is not None:
            self.forwarder.on_acked = gate.on_acked
        log.info("release %s (seq %d) is in trial, start %d of %d: proving health",
                 rec.version, rec.sequence, rec.trial_starts, rec.trial_max_starts)
        # the beacon: an own batch to be acknowledged, signed by this release at once
        self._records.append({senml.N: BEACON_NAME, senml.V: rec.sequence,
                              senml.T: time.time()})
        self.flush(force=True)
        return asyncio.create_task(self._trial(gate, stop))

    async def _trial(self, gate: TrialGate, stop: asyncio.Event) -> None:
        stats = self.forwarder.stats if self.forwarder is not None else None
        try:
            self.update_record = rec = await gate.decide(stats)
        except Exception as e:
            self.update_error = ("%s: %s" % (type(e).__name__, e))[:200]
            log.exception("the trial's outcome could not be recorded")
            return
        finally:
            if self.forwarder is not None:
                self.forwarder.on_acked = None
        if rec.state == ROLLED_BACK:
            # the previous release answers the update command at its start (the broker
            # may well be out of reach from here: that may be why the trial failed)
            self.exit_code = EXIT_ROLLED_BACK
            stop.set()  # systemd starts ``current``: the previous release
        elif self.forwarder is not None:
            self._answer_updates()
            await self.forwarder.publish_status(sign_status(self))

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Run until cancelled or SIGTERM/SIGINT; commits what is pending on the way out.
        A release in trial that is not healthy in time stops it too (``exit_code``)."""
        loop = asyncio.get_running_loop()
        tasks = self.supervisor
        stop = self._stop
        trial = self._start_updates(stop)
        if trial is None:
            self._answer_updates()
        for i in self.inputs:
            tasks.keep("input:%s" % i.cfg.name, i.run)
        tasks.keep("committer", self._committer)
        if self.node_listener is not None:
            tasks.keep("node_link", self.node_listener.run)
        if self.forwarder is not None:
            tasks.keep("forwarder", self.forwarder.run)
            tasks.keep("status", self._status)
            if self.responder is not None:
                tasks.keep("results", self._send_results)
        server = None
        if self.cfg.metrics_port:
            registry = registry_for(self)
            server = await serve_metrics(self.cfg.metrics_port,
                                         lambda: metrics_text(registry))
            self.metrics_port = server.sockets[0].getsockname()[1]
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        log.info(
            "gateway %s running: %d serial inputs, %d nodes, buffer %s",
            self.cfg.device, len(self.inputs), len(self.cfg.nodes), self.cfg.store_path,
        )  # fmt: skip
        if ready is not None:
            ready.set()
        # Type=notify: systemd counts the gateway started now, and restarts it when the
        # pings stop (a hung event loop, or a committer that no longer runs)
        sd_notify.notify("READY=1\nSTATUS=gateway %s: %d serial inputs, %d nodes"
                         % (self.cfg.device, len(self.inputs), len(self.cfg.nodes)))
        pinger = asyncio.create_task(sd_notify.watchdog(
            lambda: tasks.health["committer"].running), name="sd-watchdog")
        try:
            await stop.wait()
        finally:
            sd_notify.notify("STOPPING=1")
            self._download_stop.set()
            pinger.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            if trial is not None and not trial.done():
                trial.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trial
            await tasks.stop()
            if server is not None:
                server.close()
            while self.flush(force=True):
                pass
            self.store.close()
