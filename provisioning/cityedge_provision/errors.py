"""The provisioning tool's errors: what failed, whose fault, and what the technician does next.

Every error carries ``hint``: the next thing to try, printed under the message. The split
follows the core's: ``DeviceRefused``/``FleetRefused`` (the peer said no: retrying the same
thing fails the same way) versus ``LinkError``/``FleetUnreachable`` (the cable, the port or
the network failed: check it and run again; the steps are safe to re-run).
"""

from __future__ import annotations

from cityedge_core.errors import LocalError, PeerError
from cityedge_host.errors import UserError


class ProvisionError(UserError):
    """Base of the tool's errors (the command line's ``UserError``, printed once by the
    ``cityedge`` command); ``str(e)`` says what went wrong, ``e.hint`` what to do."""


class LinkError(ProvisionError, LocalError):
    """The serial line failed: port missing, cable pulled, device silent."""

    hint = ("check the USB cable and the port (`cityedge provision ports`), then run "
            "the same command again: it resumes")


class DeviceRefused(ProvisionError, PeerError):
    """The device answered with an error frame."""

    def __init__(self, step: str, code: int, message: str, hint: str | None = None) -> None:
        super().__init__("device refused %s: %s" % (step, message), hint)
        self.step = step
        self.code = code


class DeviceAlreadyProvisioned(DeviceRefused):
    """The device is locked: provisioned already (only hello and unlock are answered)."""

    def __init__(self, step: str, code: int, message: str, hint: str | None = None) -> None:
        super().__init__(step, code, message, hint)
        self.args = ("the device is already provisioned and locked (%s)" % message,)

    hint = ("this device is provisioned and locked; to re-provision it, unlock it from the "
            "fleet, or use `cityedge provision replace OLD_ID` for a replacement")


class FleetUnreachable(ProvisionError, LocalError):
    hint = ("check the network, or work offline: `cityedge provision --offline` with "
            "enrollment tokens fetched beforehand (`cityedge provision tokens`)")


class FleetRefused(ProvisionError, PeerError):
    """The fleet answered with an HTTP error."""

    def __init__(self, message: str, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


class NotLoggedIn(ProvisionError):
    hint = "log in with `cityedge provision login` (ask your fleet admin for an API token)"


class SelfTestFailed(ProvisionError, PeerError):
    def __init__(self, stage: str, message: str) -> None:
        hints = {
            "connect": "the broker is unreachable from the device: check the device's "
                       "network and the broker address, then run again",
            "tls": "the broker refused the device's certificate (or TLS failed): check "
                   "that the broker trusts the fleet CA and the certificate is not revoked",
            "mqtt": "the broker refused the MQTT session: check the broker's ACL",
            "publish": "the broker's rules do not take the device, or the signed batch was "
                       "not acknowledged: check that the fleet granted the device at the "
                       "broker (its ce/v1/<device>/ topics), then run again",
        }
        super().__init__("self-test failed at %s: %s" % (stage, message),
                         hints.get(stage, "run again; if it persists, report it"))
        self.stage = stage
