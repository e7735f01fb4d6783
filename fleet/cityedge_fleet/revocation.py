"""Publishing the CRL: re-sign it from the registry's revoked credentials, write it where
the broker reads it, and tell the broker (SIGHUP) to reload.

Mosquitto re-reads its ``crlfile`` on SIGHUP. An expired CRL would lock every client out,
so ``refresh_if_due`` re-signs it when less than half of its validity remains; ``fleet
serve`` calls it periodically.
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


def publish_crl(session: Session, ca: CertificateAuthority, settings: Settings) -> Path:
    revoked = [
        Revoked(serial=int(c.serial, 16), revoked_at=c.revoked_at or c.not_before)
        for c in registry.revoked_credentials(session)
    ]
    path = ca.write_crl(revoked, settings.limits.crl_validity_s)
    reload_broker(settings.broker_pid_file)
    return path


def refresh_if_due(session: Session, ca: CertificateAuthority, settings: Settings) -> bool:
    if not ca.crl_due():
        return False
    publish_crl(session, ca, settings)
    return True
