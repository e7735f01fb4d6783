"""The gateway's enrollment takes the fleet's newest trust statement before its first start.

A gateway is enrolled by a technician through the fleet's ``/enroll`` (its key made on the
gateway, the chain and the fleet's command keys written beside its TOML). The answer also
carries the offline root's newest statement of the fleet's command keys
(``EnrollResponse.trust_statement``): without it a gateway enrolled after a command-key
rotation would obey only the ``fleet_keys`` it was given (the old key, perhaps retired
because it was stolen) until a ``trust-update`` reached it.

``install_enrollment`` (``cityedge gateway install-trust --config gateway.toml ANSWER``)
checks it as a ``trust-update`` is checked (``cityedge_host.fleet_trust.install_enrolled``:
the root of ``[gateway] root_cert`` signed it, it is valid now, its version is above the
one the gateway holds) and installs it in the buffer's state, where the service reads it
at start. A statement that fails a check is refused with the reason
(``EnrollmentTrustError``, a ``UserError``: the command exits 1) and nothing is written.
It refuses while a gateway runs on that buffer (``buffer_lock``: the running gateway
holds ``<buffer>.lock``; ``BufferBusy``, a ``UserError`` whose hint says to stop the
service first), and holds that lock itself while it installs, so the gateway cannot start
in between.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cityedge_host.crypto import load_verifier
from cityedge_host.errors import UserError
from cityedge_host.fleet_trust import EnrollmentTrustError, FleetTrust, VersionMark

from .buffer_lock import BufferLock
from .config import GatewayConfig
from .store import CommandState, Store


class GatewayEnrollmentError(UserError):
    """The enrollment answer's trust statement was refused, or cannot be installed."""


def version_mark(cfg: GatewayConfig) -> VersionMark:
    """The gateway's trust version mark: a file beside its buffer."""
    return VersionMark(cfg.store_path.with_name(cfg.store_path.name + ".trust"))


def install_enrollment(cfg: GatewayConfig, answer: dict[str, Any]) -> str:
    """Install the trust statement of the fleet's enrollment ``answer`` (its JSON) into the
    gateway's buffer; returns what was done. Raises ``GatewayEnrollmentError``."""
    if not cfg.fleet_keys:
        raise GatewayEnrollmentError("the gateway trusts no fleet key: set [gateway] "
                                     "fleet_keys to the enrollment answer's fleet_keys")
    statement = answer.get("trust_statement")
    if statement is not None and not isinstance(statement, str):
        raise GatewayEnrollmentError("the enrollment answer's trust_statement is not text")
    store = Store(cfg.store_path, cfg.budget_bytes,
                  lock=BufferLock(cfg.store_path))  # BufferBusy while a gateway runs
    try:
        root = load_verifier(cfg.root_cert) if cfg.root_cert is not None else None
        trust = FleetTrust(map(load_verifier, cfg.fleet_keys), root, CommandState(store),
                           lambda: int(time.time()), version_mark(cfg))
        try:
            return trust.install_enrolled(statement)
        except EnrollmentTrustError as e:
            raise GatewayEnrollmentError(str(e), hint="ask the fleet's security team: "
                                         "the gateway keeps the keys it held") from e
    finally:
        store.close()


def read_answer(path: Path) -> dict[str, Any]:
    """The enrollment answer saved as JSON (what ``/enroll`` returned)."""
    import json

    try:
        answer = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GatewayEnrollmentError("cannot read the enrollment answer %s: %s" % (path, e)
                                     ) from e
    if not isinstance(answer, dict):
        raise GatewayEnrollmentError("%s is not an enrollment answer (a JSON object)" % path)
    return answer
