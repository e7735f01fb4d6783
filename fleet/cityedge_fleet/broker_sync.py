"""The broker's grants follow the registry: a device may connect and use its topics exactly
while it is provisioned or active and holds an active credential.

``BrokerAccess`` changes one identity at the broker (through ``broker_control``):

- ``grant(cn)``: its role (``broker_acl.acls_for``) and its client entry;
- ``cut(cn)``: deletes both; the plugin closes the client's live session at once, and
  whatever it reconnects with is denied everything (the CRL refuses a revoked
  certificate at the TLS handshake as well);
- ``kick(cn)``: closes the live session but keeps the grant (a certificate of a device
  that has another one was revoked: it must reconnect, and the CRL refuses the old one).

Who calls what:

- enrollment grants *before* its transaction commits: a certificate is never handed out
  for a device the broker would silently refuse (MQTT 3.1.1 acknowledges a denied
  PUBLISH, so the device would delete batches that were never delivered). A broker that
  cannot be told refuses the enrollment (retry later); a grant whose commit then fails
  is harmless (no certificate exists for it) and ``reconcile`` removes it;
- the routes that quarantine, retire, reactivate or revoke act after their commit;
- ``reconcile`` (``fleet serve`` runs it at start, every ``broker_sync_every_s`` and when
  the ingest quarantines a device) makes the broker's device entries equal to
  ``desired_devices`` whatever was missed: a broker that was down, a process that died
  between its commit and its call, an ingest worker in another process. It only ever
  touches device identities (``urn:dev:`` usernames); the services' entries are the
  operator's (``cityedge broker config``).

With no control certificate configured (development without a broker) every call is a
no-op and ``enabled`` is False; production mode refuses to start that way.

This class drives Mosquitto; ``broker_rabbitmq_sync.RabbitAccess`` makes the same calls on
a RabbitMQ cluster (``from_settings`` picks by ``broker_engine``). ``install_crl`` is
the CRL's way to the broker's nodes where the engine has one (Mosquitto is reloaded by
``revocation`` instead).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, col, select

from cityedge_fleet import broker_acl
from cityedge_fleet.broker_control import BrokerControl, BrokerUnavailable, CommandFailed, check
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Credential, CredentialStatus, Device, DeviceState

log = logging.getLogger(__name__)
AT_BROKER = (DeviceState.provisioned, DeviceState.active)  # states that may connect
LIST_PAGE = 1000  # client entries asked for per listClients request


def desired_devices(session: Session) -> set[str]:
    """Devices that may use the broker now: provisioned or active, with an active
    credential."""
    query = (select(Credential.device_id).join(Device, col(Device.id) == Credential.device_id)
             .where(col(Device.state).in_(AT_BROKER),
                    col(Credential.status) == CredentialStatus.active).distinct())
    return set(session.exec(query).all())


@dataclass
class Reconciled:
    granted: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)


class BrokerAccess:
    """Grants and cuts identities at one broker (no-ops without a control client)."""

    def __init__(self, control: BrokerControl | None, share_group: str) -> None:
        self.control = control
        self.share_group = share_group
        self.failures = 0  # control requests that failed (reported by /health later)

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerAccess:
        """The access for ``settings.broker_engine``: Mosquitto's control topic, or
        ``rabbitmqctl`` against a RabbitMQ cluster (``broker_rabbitmq_sync``)."""
        s = settings
        if s.broker_engine == "rabbitmq":
            # lazy: broker_rabbitmq_sync builds on this module (RabbitAccess subclasses it)
            from cityedge_fleet.broker_rabbitmq_sync import RabbitAccess

            return RabbitAccess.from_settings(s)
        control = None
        if s.broker_control_cert_file is not None and s.broker_control_key_file is not None:
            if s.mqtt_ca_file is None:
                raise ValueError("CITYEDGE_BROKER_CONTROL_CERT_FILE needs CITYEDGE_MQTT_CA_FILE "
                                 "(the CA of the broker's server certificate)")
            control = BrokerControl(s.mqtt_host, s.mqtt_port, ca_file=s.mqtt_ca_file,
                                    cert_file=s.broker_control_cert_file,
                                    key_file=s.broker_control_key_file,
                                    timeout_s=s.limits.broker_control_timeout_s)
        return cls(control, s.ingest_share_group)

    @property
    def enabled(self) -> bool:
        return self.control is not None

    def _run(self, commands: list[dict[str, object]], fine: tuple[str, ...]) -> None:
        if self.control is None:
            return
        try:
            check(self.control.run(commands), fine)
        except (BrokerUnavailable, CommandFailed):
            self.failures += 1
            raise

    def grant(self, cn: str) -> None:
        role = broker_acl.role_json(cn, self.share_group)
        self._run([{"command": "createRole", **role},
                   {"command": "createClient", **broker_acl.client_json(cn)}],
                  fine=("Role already exists", "Client already exists"))

    def grant_many(self, cns: list[str]) -> None:
        """``grant`` each of ``cns`` in one control request (a fleet registered in bulk)."""
        commands: list[dict[str, object]] = []
        for cn in cns:
            commands += [{"command": "createRole", **broker_acl.role_json(cn, self.share_group)},
                         {"command": "createClient", **broker_acl.client_json(cn)}]
        self._run(commands, fine=("Role already exists", "Client already exists"))

    def cut(self, cn: str) -> None:
        self._run([{"command": "deleteClient", "username": cn},
                   {"command": "deleteRole", "rolename": broker_acl.role_name(cn)}],
                  fine=("Client not found", "Role not found"))

    def kick(self, cn: str) -> None:
        self._run([{"command": "disableClient", "username": cn},
                   {"command": "enableClient", "username": cn}],
                  fine=("Client not found",))

    def install_crl(self, crl_file: Path | None = None) -> dict[str, str]:
        """Nothing here: Mosquitto re-reads its own CRL file on SIGHUP (``revocation``)."""
        return {}

    def clients(self) -> set[str]:
        """Every username the broker's plugin knows."""
        if self.control is None:
            return set()
        names: set[str] = set()
        offset = 0
        while True:
            responses = self.control.run([{"command": "listClients", "count": LIST_PAGE,
                                           "offset": offset}])
            check(responses)
            data = responses[0].get("data") or {}
            page = [c for c in data.get("clients", []) if isinstance(c, str)]
            names.update(page)
            offset += len(page)
            if not page or offset >= int(data.get("totalCount", 0)):
                return names

    def reconcile(self, session: Session) -> Reconciled:
        """Make the broker's device entries equal to ``desired_devices``."""
        done = Reconciled()
        if self.control is None:
            return done
        want = desired_devices(session)
        have = {cn for cn in self.clients()
                if broker_acl.identity_kind(cn) == broker_acl.DEVICE}
        for cn in sorted(want - have):
            self.grant(cn)
            done.granted.append(cn)
        for cn in sorted(have - want):
            self.cut(cn)
            done.cut.append(cn)
        return done

    def follow(self, device_id: str, accepting: bool) -> None:
        """After a commit that changed ``device_id``: grant or cut it. A failure is logged
        and counted, and left to ``reconcile``."""
        try:
            if accepting:
                self.grant(device_id)
            else:
                self.cut(device_id)
        except (BrokerUnavailable, CommandFailed) as e:
            log.warning("broker not updated for %s (%s); the next reconcile will", device_id, e)

    def kick_or_log(self, device_id: str) -> None:
        """``kick``, a failure logged and counted (the CRL still refuses a reconnect)."""
        try:
            self.kick(device_id)
        except (BrokerUnavailable, CommandFailed) as e:
            log.warning("could not close %s's broker session (%s)", device_id, e)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()


class Reconciler:
    """``fleet serve``'s thread: reconcile at start, every ``every_s``, and on ``wake``."""

    def __init__(self, access: BrokerAccess, session_factory: Callable[[], Session],
                 every_s: float, also: Callable[[Session], None] | None = None) -> None:
        self.access = access
        self.session_factory = session_factory
        self.every_s = every_s
        self.also = also  # more to keep in step per round (the CRL: ``revocation``)
        self.rounds = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def round(self) -> Reconciled:
        with self.session_factory() as session:
            if self.also is not None:
                self.also(session)
            done = self.access.reconcile(session)
        self.rounds += 1
        if done.granted or done.cut:
            log.info("broker reconciled: granted %d, cut %d", len(done.granted), len(done.cut))
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # a broker or database fault: try again next round
                log.exception("broker reconcile failed")
            self._wake.wait(self.every_s)
            self._wake.clear()

    def alive(self) -> bool:
        """The reconciler's thread runs (``fleet serve``'s watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self._loop, name="broker-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
