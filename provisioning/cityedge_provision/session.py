"""Provisioning one device, step by step, resumable: the tool's state machine.

``ProvisionSession.run()`` walks the steps below. Each step looks at what the device says
(its ``hello`` state and key id) and at the technician's session record
(``Workspace.session``), and does only what is missing, so running it again after any
failure resumes where it stopped:

==========  ==================================================================================
connect     open the port, ``hello``; a locked device stops here (already provisioned),
            unless it is the one this laptop was provisioning and only the reply to
            ``lock`` was lost
fleet       find the device in the fleet by its URN; register it (serial, model, site) if
            absent; a device the fleet already enrolled continues only if this laptop holds
            that enrollment for the device's current key (an interrupted run)
key         ``generate_key`` on the device unless it already has a key (``--restart`` makes a
            new one, refused once the fleet has a certificate for the old one)
csr         the device builds and signs a PKCS#10 request (the private key stays on it)
enroll      get an enrollment token (online, or pre-fetched for offline work) and ``POST
            /enroll``; for a device from a vendor manifest (``bulk``), no token: the claim
            secret the device reported in ``hello`` (checked first against the manifest's
            SHA-256). The answer is saved to the session record at once. Offline, the CSR
            is queued for ``cityedge provision sync`` and the run ends here (``queued``);
            with a ticket the device can use (see ``ticket_for``), the device is handed
            it and retries the enrollment itself until the fleet answers
install     certificate, CA, broker, config and the fleet keys it trusts for commands (the
            fleet's trust store from the enrollment answer; ``--fleet-key`` overrides it)
            to the device (written atomically there), with the offline root's trust
            statement of the fleet's command keys when the answer carries one: the device
            checks it against its root and says ``installed`` (the version it holds) or
            ``refused`` (why; nothing installed, the run goes on and ends with a warning)
self_test   the device connects to the broker with its new identity and publishes one
            signed batch; failures say whether the broker was unreachable or refused us
lock        provisioning mode is closed; the session record is replaced by a log line
==========  ==================================================================================

Consistency: the fleet's only irreversible step is ``enroll`` (a one-time token is used,
a certificate issued). Its answer is persisted before anything else happens, so a cable
pulled after it resumes at ``install`` with the same certificate instead of leaving a
dangling credential. The device's steps are each atomic on the device.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cityedge_core import csr, frame
from cityedge_provision.errors import (
    DeviceAlreadyProvisioned,
    FleetRefused,
    ProvisionError,
    SelfTestFailed,
)
from cityedge_provision.fleet_client import FleetClient, Workspace
from cityedge_provision.limits import LIMITS, ProvisionLimits
from cityedge_provision.transport import SerialTransport

TICKET_FIELD = frame.F_TICKET  # install-request field with the offline enrollment ticket
TICKET_PATH = "/enroll/ticket"  # the fleet endpoint a device with a ticket enrolls at

STEPS = ("connect", "fleet", "key", "csr", "enroll", "install", "self_test", "lock")


@dataclass
class DeviceInfo:
    model: str
    serial: str
    firmware: str
    state: str
    device: str
    kid: bytes | None
    # the vendor's claim secret from the device's flash (a secret: never shown or saved)
    claim: str | None = field(default=None, repr=False)

    @classmethod
    def from_hello(cls, msg: dict[int, Any]) -> DeviceInfo:
        kid = msg.get(frame.F_KID)
        claim = msg.get(frame.F_CLAIM)
        return cls(str(msg.get(frame.F_MODEL, "")), str(msg.get(frame.F_SERIAL, "")),
                   str(msg.get(frame.F_FIRMWARE, "")), str(msg.get(frame.F_STATE, "")),
                   str(msg.get(frame.F_DEVICE, "")), kid if isinstance(kid, bytes) else None,
                   claim if isinstance(claim, str) and claim else None)


@dataclass
class Options:
    site: str = ""
    hardware_class: str = ""
    tags: list[str] = field(default_factory=list)
    offline: bool = False
    restart: bool = False
    self_test: bool = True
    fleet_keys: list[bytes] = field(default_factory=list)
    server_hostname: str | None = None
    expect_serial: str | None = None  # bulk mode: the manifest's serial for this port
    register: dict[str, Any] = field(default_factory=dict)  # extra fields (replace)
    allow_list: bool = False  # enroll by the vendor manifest's allow-list, no token
    expect_claim_sha256: str | None = None  # bulk mode: the manifest's claim hash
    # offline ticket: the fleet's URL (default: the login URL), the CA of its HTTPS
    # certificate (DER), and the explicit development-only permission for http://
    enroll_url: str | None = None
    fleet_ca: bytes | None = None
    dev_http_enroll: bool = False
    # asked after ``connect`` with what was found; False stops before anything changes
    confirm: Callable[[DeviceInfo], bool] | None = None


@dataclass
class StepResult:
    name: str
    detail: str
    seconds: float


@dataclass
class Outcome:
    # "provisioned", "installed" (self-test skipped), "queued" (offline) or "ticket"
    # (offline, and the device was handed a ticket to enroll itself)
    status: str
    device: str
    serial: str
    kid: str
    site: str
    steps: list[StepResult]
    # what went wrong without stopping the run (a trust statement the device refused)
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


class ProvisionSession:
    """One device on one port (see the module docstring)."""

    def __init__(self, transport: SerialTransport, workspace: Workspace,
                 fleet: FleetClient | None, options: Options | None = None,
                 on_start: Callable[[str], None] | None = None,
                 on_step: Callable[[StepResult], None] | None = None,
                 limits: ProvisionLimits = LIMITS) -> None:
        self.t = transport
        self.ws = workspace
        self.fleet = fleet
        self.opts = options or Options()
        self.on_start = on_start or (lambda name: None)
        self.on_step = on_step or (lambda result: None)
        self.limits = limits
        self.steps: list[StepResult] = []
        self.current: str | None = None  # the step running (set while it runs or failed)
        self.info: DeviceInfo | None = None
        self.record: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.site = self.opts.site

    # --- the walk ----------------------------------------------------------------------
    def run(self) -> Outcome:
        self._step("connect", self.connect)
        if self.opts.confirm is not None and not self.opts.confirm(self._info()):
            raise ProvisionError("cancelled: nothing was changed on the device or the fleet",
                                 "run again and answer yes, or pass --yes")
        self._step("fleet", self.check_fleet)
        self._step("key", self.make_key)
        csr_pem = self._step("csr", self.make_csr)
        if not self._step("enroll", lambda: self.enroll(csr_pem)):
            ticket = self._info().state == "pending-enrollment"
            return self._outcome("ticket" if ticket else "queued")
        self._step("install", self.install)
        self._step("self_test", self.self_test)
        if not self.opts.self_test:
            return self._outcome("installed")  # stays open until a self-test passes
        self._step("lock", self.lock)
        return self._outcome("provisioned")

    def _step(self, name: str, fn: Callable[[], Any]) -> Any:
        self.on_start(name)
        self.current = name
        t0 = time.monotonic()
        value = fn()
        self.current = None
        detail, result = value if isinstance(value, tuple) else (value, True)
        if detail is None:  # nothing to do in this step (resumed past it)
            return result
        step = StepResult(name, detail, time.monotonic() - t0)
        self.steps.append(step)
        self.on_step(step)
        return result

    def _outcome(self, status: str) -> Outcome:
        info = self._info()
        return Outcome(status, info.device, info.serial, (info.kid or b"").hex(), self.site,
                       self.steps, self.warnings)

    def _info(self) -> DeviceInfo:
        assert self.info is not None, "connect runs first"
        return self.info

    def _save(self) -> None:
        self.ws.save_session(self._info().serial, self.record)

    # --- steps -------------------------------------------------------------------------
    def connect(self) -> str:
        self.t.ensure_connected()
        self.info = DeviceInfo.from_hello(self.t.request(frame.T_HELLO,
                                                         timeout_s=self.limits.open_timeout_s))
        info = self.info
        if self.opts.expect_serial is not None and info.serial != self.opts.expect_serial:
            raise ProvisionError("the device connected has serial %s, not %s from the "
                                 "manifest" % (info.serial, self.opts.expect_serial),
                                 "plug in the right device, or fix the manifest")
        self.record = self.ws.session(info.serial) or {"serial": info.serial,
                                                        "device": info.device}
        if self.record.get("device") != info.device:
            self.record = {"serial": info.serial, "device": info.device}
        if info.state == "locked" and not self._enrolled_here():
            entry = self._ticket_entry()
            if entry is None:
                raise DeviceAlreadyProvisioned("hello", frame.E_LOCKED,
                                               "%s, serial %s" % (info.device, info.serial))
            if self.fleet is None:
                raise ProvisionError(
                    "%s enrolled itself with the ticket this laptop gave it" % info.device,
                    "nothing to do on the device; run `cityedge provision sync` when online "
                    "to record it here")
            self._redeem_ticket(entry)  # the device was first: the same certificate
        return "%s %s, serial %s, firmware %s, state %s" % (
            info.model, info.device, info.serial, info.firmware, info.state)

    def _ticket_entry(self) -> dict[str, Any] | None:
        """The queued offline CSR whose ticket the device holds for its current key."""
        info = self._info()
        for entry in self.ws.queued():
            if entry.get("serial") == info.serial and entry.get("ticket") and \
                    entry.get("token") and info.kid is not None and \
                    entry.get("kid") == info.kid.hex():
                return entry
        return None

    def _redeem_ticket(self, entry: dict[str, Any]) -> bool:
        """Enroll with the ticket's token, or get what the device already got with it."""
        assert self.fleet is not None
        answer, by_device = self.fleet.enroll_ticket(
            str(entry["serial"]), str(entry["token"]), str(entry["csr_pem"]))
        self.record["kid"] = entry["kid"]
        self.record["enrollment"] = answer
        self._save()
        self.ws.unqueue(str(entry["serial"]))
        self.ws.drop_token(str(entry["serial"]))
        return by_device

    def _enrolled_here(self) -> bool:
        """This laptop holds the fleet's answer for the device's current key."""
        info = self._info()
        return info.kid is not None and "enrollment" in self.record and \
            self.record.get("kid") == info.kid.hex()

    def check_fleet(self) -> str:
        info = self._info()
        if self.fleet is None:
            return "offline: the fleet is checked at `cityedge provision sync`"
        dev = self.fleet.get_device(info.device)
        if dev is None:
            body = {"id": info.device, "serial": info.serial, "model": info.model,
                    "hardware_class": self.opts.hardware_class or info.model,
                    "site": self.opts.site, "firmware_version": info.firmware,
                    "tags": self.opts.tags}
            body.update(self.opts.register)
            self.fleet.register_device(body)
            self.site = str(body.get("site", ""))
            return "registered %s at site %s" % (info.device, self.site or "(none)")
        if dev.get("serial") != info.serial:
            raise FleetRefused("the fleet has %s with serial %s, but this device says %s"
                               % (info.device, dev.get("serial"), info.serial), 409,
                               "the device or the registry is wrong: ask a fleet admin")
        self.site = str(dev.get("site") or self.opts.site)
        state = dev.get("state")
        if state == "registered":
            if self.opts.site and dev.get("site") != self.opts.site:
                self.fleet.update_device(info.device, {"site": self.opts.site})
                self.site = self.opts.site
            return "found %s (registered) at site %s" % (info.device, self.site or "(none)")
        if state == "retired":
            raise FleetRefused("%s is retired in the fleet" % info.device, 409,
                               "a retired device is not provisioned again")
        if self._enrolled_here():
            return "found %s (%s): resuming the enrollment made earlier" % (info.device, state)
        raise FleetRefused(
            "the fleet already enrolled %s (%s) for another key" % (info.device, state), 409,
            "if the device was reset, its old certificate must not stay valid: ask the "
            "security team to revoke it and re-open the device's enrollment in the fleet, "
            "then run this again")

    def make_key(self) -> str:
        info = self._info()
        if info.state != "unprovisioned" and not self.opts.restart:
            return "kept the device's key (kid %s)" % (info.kid or b"").hex()
        if self._enrolled_here():
            raise ProvisionError("the fleet has a certificate for this device's key: a new key "
                                 "would leave it dangling", "run without --restart")
        reply = self.t.request(frame.T_GENERATE_KEY, timeout_s=self.limits.keygen_timeout_s)
        kid = reply.get(frame.F_KID)
        if not isinstance(kid, bytes):
            raise ProvisionError("the device's generate_key reply has no key id")
        info.kid = kid
        info.state = "keyed"
        self.record = {"serial": info.serial, "device": info.device, "kid": kid.hex()}
        self._save()
        return "P-256 key generated on the device (kid %s)" % kid.hex()

    def make_csr(self) -> tuple[str | None, str]:
        info = self._info()
        if self._enrolled_here():
            return None, ""
        reply = self.t.request(frame.T_CSR, timeout_s=self.limits.csr_timeout_s)
        der = reply.get(frame.F_CSR)
        if not isinstance(der, bytes):
            raise ProvisionError("the device's csr reply holds no request")
        req = x509.load_der_x509_csr(der)
        if not req.is_signature_valid:
            raise ProvisionError("the device's CSR signature does not verify",
                                 "run again; if it persists the device is faulty")
        self.record["kid"] = (info.kid or b"").hex()
        return "PKCS#10 request signed on the device (%d bytes)" % len(der), \
            csr.pem("CERTIFICATE REQUEST", der)

    def enroll(self, csr_pem: str) -> tuple[str, bool]:
        info = self._info()
        if self._enrolled_here():
            return "certificate issued earlier (resumed)", True
        token = None if self.opts.allow_list else self.ws.take_token(info.serial)
        claim = self._claim() if self.opts.allow_list else None
        if self.fleet is None:
            if token is None and not self.opts.allow_list:
                raise ProvisionError(
                    "no valid enrollment token for serial %s on this laptop (expired, used "
                    "or never fetched)" % info.serial,
                    "while online, fetch one: `cityedge provision tokens %s`; the device "
                    "keeps its key, run again afterwards" % info.serial)
            ticket = self.ticket_for(token) if token is not None else None
            self.ws.queue(info.serial, {
                "serial": info.serial, "device": info.device, "kid": self.record["kid"],
                "csr_pem": csr_pem, "token": token, "site": self.opts.site,
                "model": info.model, "firmware": info.firmware,
                "hardware_class": self.opts.hardware_class or info.model,
                "ticket": ticket is not None, "claim": claim,
                "queued_at": dt.datetime.now(dt.UTC).isoformat()})
            if ticket is None:
                return ("offline: CSR queued; run `cityedge provision sync` when online, "
                        "then connect the device again to install its certificate"), False
            self.t.request(frame.T_INSTALL, {TICKET_FIELD: ticket})
            info.state = "pending-enrollment"
            return ("offline: CSR queued; the device enrolls itself at %s when it reaches "
                    "the fleet (or run `cityedge provision sync`)" % ticket["url"]), False
        entry = self._ticket_entry()
        if entry is not None:  # the device holds a ticket with this laptop's token
            if self._redeem_ticket(entry):
                return "the device had enrolled itself with its ticket (same certificate)", True
            return "certificate issued by the fleet CA (the offline ticket's token)", True
        if token is None and not self.opts.allow_list:
            token = str(self.fleet.enrollment_token(
                info.serial, self.limits.enroll_token_ttl_s)["token"])
        try:
            answer = self.fleet.enroll(info.serial, token, csr_pem, claim)
        except FleetRefused as e:
            if claim is None or e.status != 403:
                raise
            raise FleetRefused(
                "the fleet did not accept serial %s with its claim secret" % info.serial, 403,
                "its manifest may not be uploaded, or the claim was used already (the "
                "device was enrolled before): ask the fleet's security team, or provision "
                "it with a token (`cityedge provision --port PORT`)") from e
        self.record["enrollment"] = answer
        self._save()  # before anything else: the fleet's step cannot be undone
        self.ws.drop_token(info.serial)
        return "certificate issued by the fleet CA (%s)" % (
            "vendor allow-list" if token is None else "one-time token"), True

    def _claim(self) -> str:
        """The device's claim secret, checked against the manifest's hash when given."""
        info = self._info()
        if info.claim is None:
            raise ProvisionError(
                "the device (serial %s) reports no claim secret, so it cannot enroll from "
                "the vendor manifest" % info.serial,
                "provision it with a token: `cityedge provision --port PORT`")
        want = self.opts.expect_claim_sha256
        got = hashlib.sha256(info.claim.encode()).hexdigest()
        if want is not None and not hmac.compare_digest(got, want):
            raise ProvisionError(
                "the device's claim secret does not match the manifest's claim for serial %s"
                % info.serial, "the device or the manifest is wrong: ask the vendor; do not "
                "enroll it by hand")
        return info.claim

    def ticket_for(self, token: str) -> dict[str, Any] | None:
        """The offline enrollment ticket for the device, or None if it could not use one.

        ``https://`` needs the CA of the fleet's HTTPS certificate (``--fleet-ca``);
        ``http://`` only with the explicit development-only ``--dev-http-enroll``."""
        info = self._info()
        url = self.opts.enroll_url
        if url is None:
            try:
                url = self.ws.login()[0]
            except ProvisionError:
                return None
        url = url.rstrip("/") + TICKET_PATH
        dev_http = url.startswith("http://")
        if dev_http and not self.opts.dev_http_enroll:
            return None
        if not dev_http and self.opts.fleet_ca is None:
            return None
        ticket: dict[str, Any] = {
            "token": token, "url": url, "dev_http": dev_http,
            "register": {"id": info.device, "model": info.model,
                         "hardware_class": self.opts.hardware_class or info.model,
                         "site": self.opts.site, "firmware_version": info.firmware},
            "fleet_keys": self.opts.fleet_keys or self.ws.fleet_keys(),
            "server_hostname": self.opts.server_hostname}
        if self.opts.fleet_ca is not None:
            ticket["ca"] = self.opts.fleet_ca
        return ticket

    def install(self) -> str:
        info = self._info()
        if info.state in ("tested", "locked"):
            return "installed earlier"
        ans = self.record["enrollment"]
        chain = [c.public_bytes(serialization.Encoding.DER)
                 for c in x509.load_pem_x509_certificates(ans["chain_pem"].encode())]
        cas = [c.public_bytes(serialization.Encoding.DER)
               for c in x509.load_pem_x509_certificates(ans["ca_bundle_pem"].encode())]
        url = urlsplit(ans["broker_url"])
        host = url.hostname or "127.0.0.1"
        port = url.port or 8883
        broker = {"host": host, "port": port,
                  "server_hostname": self.opts.server_hostname or host}
        fields: dict[int, Any] = {
            frame.F_CHAIN: chain, frame.F_CA: cas, frame.F_BROKER: broker,
            frame.F_CONFIG: ans.get("config") or {}, frame.F_FLEET_KEYS: self.fleet_keys(ans)}
        statement = self.trust_statement(ans)
        if statement is not None:
            fields[frame.F_STATEMENT] = statement
            fields[frame.F_NOW] = int(time.time())  # for a device without a clock
        reply = self.t.request(frame.T_INSTALL, fields)
        info.state = "installed"
        detail = "certificate, CA and config installed (broker %s:%d)" % (host, port)
        if statement is None:
            return detail
        trust = reply.get(frame.F_TRUST)
        version = reply.get(frame.F_TRUST_VERSION)
        if trust == "installed" and isinstance(version, int):
            return detail + "; the fleet's trust statement v%d installed" % version
        if trust == "refused":
            self.warn("the device refused the fleet's trust statement: %s. It trusts only "
                      "the fleet keys installed with it; tell the fleet's security team "
                      "(a statement the device's root did not sign is an attack or a "
                      "misconfigured fleet)" % reply.get(frame.F_MESSAGE, "no reason given"))
        else:
            self.warn("the device's firmware did not take the fleet's trust statement (it "
                      "predates it); it trusts only the fleet keys installed with it")
        return detail + "; the fleet's trust statement NOT installed (see the warning)"

    def trust_statement(self, answer: dict[str, Any]) -> bytes | None:
        """The root's trust statement from the enrollment answer (base64 there), as the
        root signed it; None when the fleet has none. One that is not base64 is reported
        (a warning) and not sent: the device could only refuse it."""
        text = answer.get("trust_statement")
        if not text:
            return None
        try:
            return base64.b64decode(str(text), validate=True)
        except (binascii.Error, ValueError):
            self.warn("the fleet's trust statement is not base64; not sent to the device, "
                      "which trusts only the fleet keys installed with it")
            return None

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def fleet_keys(self, answer: dict[str, Any]) -> list[bytes]:
        """The keys the device will trust for fleet commands: the fleet's own trust store,
        from its enrollment answer, unless ``--fleet-key`` files override it."""
        if self.opts.fleet_keys:
            return self.opts.fleet_keys
        keys = answer.get("fleet_keys") or []
        try:
            return [bytes.fromhex(k) for k in keys]
        except (TypeError, ValueError) as e:
            raise FleetRefused("the fleet's enrollment answer has a fleet key that is not "
                               "a hex SEC1 point", 0) from e

    def self_test(self) -> str:
        info = self._info()
        if not self.opts.self_test:
            return "skipped (--no-self-test): the device stays unlocked"
        if info.state in ("tested", "locked"):
            return "passed earlier"
        reply = self.t.request(frame.T_SELF_TEST, {frame.F_TIMEOUT: self.limits.self_test_s},
                               timeout_s=self.limits.self_test_s
                               + self.limits.self_test_margin_s)
        if reply.get(frame.F_OK) is not True:
            raise SelfTestFailed(str(reply.get(frame.F_STAGE)), str(reply.get(frame.F_MESSAGE)))
        info.state = "tested"
        return "connected over mTLS, signed batch %s acknowledged" % reply.get(frame.F_SEQ)

    def lock(self) -> str:
        info = self._info()
        detail = "provisioning mode closed"
        if info.state == "locked":  # our last run locked it but the reply was lost
            detail = "locked already (by the interrupted run)"
        else:
            self.t.request(frame.T_LOCK)
            info.state = "locked"
        self.ws.end_session(info.serial)
        self.ws.log_provisioned({"device": info.device, "serial": info.serial,
                                 "kid": (info.kid or b"").hex(), "site": self.site,
                                 "at": dt.datetime.now(dt.UTC).isoformat()})
        return detail
