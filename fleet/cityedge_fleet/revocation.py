"""Publishing the CRL: re-sign it from the registry's revoked credentials, write it where
the broker reads it, and tell the broker (``tell_broker``).

Mosquitto re-reads its ``crlfile`` on SIGHUP. A RabbitMQ cluster reads a CRL directory
on every node at every handshake: the CRL is copied into each node's directory
(``broker_rabbitmq_sync.RabbitAccess.install_crl``; a node it missed gets it at the
reconciler's next round). An expired CRL would lock every client out,
so ``refresh_if_due`` re-signs it when less than half of its validity remains, or when
it differs from the registry; ``fleet serve`` calls it periodically (``broker_sync``).
Suspended credentials (a quarantined device) are listed with reason ``certificateHold``
and leave the CRL when the device is reactivated.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from sqlmodel import Session

from cityedge_fleet import registry
from cityedge_fleet.ca import CertificateAuthority, Revoked
from cityedge_fleet.config import Settings
from cityedge_fleet.models import CredentialStatus

log = logging.getLogger(__name__)


def reload_broker(pid_file: Path | None) -> bool:
    """SIGHUP the broker named by ``pid_file``; False when there is none to signal."""
    if pid_file is None:
        return False
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        log.warning("cannot signal the broker from %s: %s", pid_file, e)
        return False
    return True


def tell_broker(settings: Settings | None, crl_file: Path, *,
                pid_file: Path | None = None) -> bool:
    """The broker takes the CRL now: Mosquitto is reloaded (SIGHUP to ``pid_file``, by
    default the settings' ``broker_pid_file``; it re-reads ``crl.pem`` and
    ``broker-ca.pem``), a RabbitMQ cluster's nodes get the file, one CRL per issuer (a
    certificate whose issuer has no CRL there is refused; the nodes trust the root and a
    device sends its intermediate, so a CA rollover needs no new bundle there). Called
    by ``ca rollover`` before its switch, with the settings when a fleet is configured
    here (None otherwise: only a pid file). False when it could not be told (logged;
    the reconciler tries again)."""
    if settings is None or settings.broker_engine != "rabbitmq":
        if pid_file is None and settings is not None:
            pid_file = settings.broker_pid_file
        return reload_broker(pid_file)
    # lazy: only a RabbitMQ fleet talks to its broker here (Mosquitto gets a signal)
    from cityedge_fleet.broker_control import BrokerUnavailable, CommandFailed
    from cityedge_fleet.broker_sync import BrokerAccess

    try:
        access = BrokerAccess.from_settings(settings)
        if not access.enabled:
            return False
        access.install_crl(crl_file)
    except (BrokerUnavailable, CommandFailed, ValueError) as e:
        log.warning("the CRL is not on every broker node yet (%s); the reconciler retries", e)
        return False
    return True


def _listed(session: Session) -> list[Revoked]:
    return [
        Revoked(serial=int(c.serial, 16), revoked_at=c.revoked_at or c.not_before,
                on_hold=c.status == CredentialStatus.suspended)
        for c in registry.revoked_credentials(session)
    ]


def publish_crl(session: Session, ca: CertificateAuthority, settings: Settings) -> bool:
    """Re-sign the CRL from the registry and tell the broker; whether the broker took it
    (``tell_broker``)."""
    return tell_broker(settings, ca.write_crl(_listed(session), settings.limits.crl_validity_s))


def refresh_if_due(session: Session, ca: CertificateAuthority, settings: Settings) -> bool:
    """Re-sign and publish the CRL when half its life is gone, or when it does not list
    exactly what the registry revoked and suspended (a change another process committed:
    the ingest quarantining a device)."""
    listed = _listed(session)
    if not ca.crl_due() and ca.crl_serials() == {r.serial for r in listed}:
        return False
    tell_broker(settings, ca.write_crl(listed, settings.limits.crl_validity_s))
    return True
