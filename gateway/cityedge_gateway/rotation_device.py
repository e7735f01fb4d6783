"""The Pi gateway's half of key rotation: the ``rotate``, ``install-cert`` and ``erase-key``
command handlers (``cityedge_host.command_responder``), over the key slots (``key_slots``).

The protocol and its reasons are ``cityedge_core.rotation``'s docstring; the command gate
has already checked signature, target, expiry and seq. Each handler:

=================  ===========================================================================
command            does, or refuses (``Refuse``: the reason goes back to the fleet)
=================  ===========================================================================
``rotate``         a new key in the slot that is not current, a CSR for it (CN and SAN = the
                   gateway), the proof signed by the *current* key, published on ``up/csr``;
                   ``ok``. Refused: no key slots (``identity_dir`` not configured), bad args.
                   Failed: the CSR could not be published (the link broke).
``install-cert``   the certificate must hold the pending key of this rotation; stored, the
                   pointer moved (``KeySlots.install``); ``ok``; *after* the answer was
                   sent: batches, results and status are signed with the new key (the
                   chain goes on: same seq counter, same previous hash) and the forwarder
                   reconnects with the new certificate. Refused: no pending key, another
                   rotation's, a certificate for another key.
``erase-key``      the key named by kid is erased if it is in the slot that is not current;
                   ``ok`` (also when it is not here: the goal holds). Refused: it is the
                   current key.
=================  ===========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cityedge_core import rotation, topics
from cityedge_core.errors import LimitError, MalformedError
from cityedge_host.command_responder import Done, Handler, Refuse
from cityedge_host.crypto import EcSigner

from .forwarder import Forwarder
from .key_slots import Identity, IdentityError, KeySlots

log = logging.getLogger(__name__)

NO_SLOTS = ("key rotation needs key slots: this gateway signs with a fixed key file "
            "(set [gateway] identity_dir)")


class GatewayRotation:
    """The rotation commands of one gateway. ``current()`` is the key in use;
    ``switch(identity)`` makes the gateway use a new one (signing and TLS)."""

    def __init__(self, device: str, slots: KeySlots | None, forwarder: Forwarder,
                 current: Callable[[], EcSigner], switch: Callable[[Identity], None]) -> None:
        self.device = device
        self.slots = slots
        self.forwarder = forwarder
        self.current = current
        self.switch = switch

    def handlers(self) -> dict[str, Handler]:
        return {rotation.ROTATE: self.rotate, rotation.INSTALL_CERT: self.install_cert,
                rotation.ERASE_KEY: self.erase_key}

    def _slots(self) -> KeySlots:
        if self.slots is None:
            raise Refuse(NO_SLOTS)
        return self.slots

    async def rotate(self, args: Any) -> Done:
        slots = self._slots()
        try:
            rid = rotation.rotate_args(args)
        except MalformedError as e:
            raise Refuse(str(e)) from e
        new, csr_der = slots.begin(rid)
        signer = self.current()
        message = rotation.csr_message(signer, signer.kid, self.device, rid, csr_der)
        if not await self.forwarder.publish_up(topics.CSR, message):
            raise ConnectionError("the CSR could not be published")
        log.info("rotation %d: new key %s, CSR sent", rid, new.kid.hex())
        return Done("CSR sent", {"new_kid": new.kid.hex()})

    async def install_cert(self, args: Any) -> Done:
        slots = self._slots()
        try:
            rid, cert_der = rotation.install_cert_args(args)
            new = slots.install(rid, cert_der)
        except (MalformedError, LimitError, IdentityError) as e:
            raise Refuse(str(e)) from e

        def switch() -> None:
            try:
                self.switch(new)
            except Exception:  # the pointer moved: the next start uses the new key
                log.exception("rotation %d: switching to the new key failed", rid)

        self.forwarder.after_answer = switch
        log.info("rotation %d: certificate installed, slot %d current", rid, new.slot)
        return Done("certificate installed; key %s current" % new.kid.hex())

    async def erase_key(self, args: Any) -> Done:
        slots = self._slots()
        try:
            rid, kid = rotation.erase_key_args(args)
            erased = slots.erase(kid)
        except (MalformedError, IdentityError) as e:
            raise Refuse(str(e)) from e
        log.info("rotation %d: key %s %s", rid, kid.hex(), "erased" if erased else "not here")
        return Done("key %s %s" % (kid.hex(), "erased" if erased else "not here (erased)"))
