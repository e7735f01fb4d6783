"""Emergency revocation: cut a device off now (``cityedge keys revoke DEVICE --reason
key-compromise``, ``POST /devices/{id}/revoke``).

``revoke_device`` does, in order:

1. in one transaction: the device is quarantined (unless it is quarantined or retired
   already), **every** certificate of it not yet revoked is revoked (active and suspended
   alike: a quarantine alone only suspends, and reactivating would restore them), its open
   key rotation fails ("device revoked"), and the action is audited ``device.revoke`` with
   the reason and the serials;
2. after the commit: the CRL is re-signed and the broker reloaded (SIGHUP: a TLS handshake
   with any of those certificates is refused from then on), and the device is cut at the
   broker (``BrokerAccess.cut``: its client entry and role are deleted, which closes its
   live session at once and denies whatever it reconnects with).

The ingest refuses the device's batches from the commit on: a quarantined device is not
accepting (``acceptance`` rule 3), whatever key signed the batch and however long it sat
queued at the broker. Reactivating the device later restores none of the revoked
certificates: it needs a technician and a new enrollment.
"""

from __future__ import annotations

import logging

from sqlmodel import Session, col, select

from cityedge_fleet import audit, registry, revocation, rotation
from cityedge_fleet.broker_control import BrokerUnavailable, CommandFailed
from cityedge_fleet.broker_sync import BrokerAccess
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import Settings
from cityedge_fleet.models import (
    Credential,
    CredentialStatus,
    Device,
    DeviceState,
    RevokePublic,
    RevokeReason,
)

log = logging.getLogger(__name__)


class RevokeError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def revoke_device(session: Session, *, device_id: str, reason: RevokeReason, note: str,
                  by: str, source: str, ca: CertificateAuthority, settings: Settings,
                  broker: BrokerAccess) -> RevokePublic:
    """The steps above; RevokeError 404 for an unknown device, 409 for one never enrolled
    (nothing to revoke; retiring it is what stops it)."""
    device = session.exec(select(Device).where(col(Device.id) == device_id)
                          .with_for_update()).first()
    if device is None:
        raise RevokeError(404, "no device %s" % device_id)
    was = DeviceState(device.state)
    if was == DeviceState.registered:
        raise RevokeError(409, "device %s is registered, not enrolled: it has no certificate "
                          "to revoke (retire it so it can never enroll)" % device_id)
    if was not in (DeviceState.quarantined, DeviceState.retired):
        registry.set_state(session, device=device, state=DeviceState.quarantined)
    revoked = []
    for cred in session.exec(select(Credential).where(
            col(Credential.device_id) == device_id,
            col(Credential.status) != CredentialStatus.revoked)).all():
        registry.revoke_credential(session, credential=cred)
        revoked.append(cred.serial)
    rotation.abort(session, device_id, by=by, reason="device revoked (%s)" % reason.value)
    audit.append(session, actor=by, action="device.revoke", outcome=audit.OK,
                 target=device_id, source=source,
                 detail={"reason": reason.value, "note": note, "from": was.value,
                         "revoked": revoked})
    session.commit()
    revocation.publish_crl(session, ca, settings)
    cut = True
    try:
        broker.cut(device_id)
    except (BrokerUnavailable, CommandFailed) as e:  # the CRL refuses it all the same;
        cut = False  # the reconciler cuts it at its next round
        log.error("revoked %s but could not cut it at the broker: %s", device_id, e)
    listed = ca.crl_serials() or set()
    return RevokePublic(device_id=device_id, reason=reason, state=DeviceState(device.state),
                        revoked=revoked, broker_cut=cut and broker.enabled,
                        crl_serials=len(listed))
