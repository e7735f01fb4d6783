"""The device's provisioning state machine under any sequence of requests (hypothesis),
run on CPython against a temp directory as its flash: it never raises, answers every
request with its reply or an error frame, and keeps the files consistent with its state.

(The self-test's network part, which the state machine is given, is a stub that passes or
fails as drawn; the real one, ``provision_selftest``, runs on the MicroPython unix port in
``test_device_pty`` and ``test_selftest_stages``.)"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from prov_helpers import INFO, URN, FakeUart, pki

from cityedge_core import cbor, frame
from cityedge_fw import provision

from support.device_cert import issue_for_csr

CLAIM = "Zm9vYmFyYmF6cXV4LWNsYWltLXNlY3JldC0wMTIzNDU2Nzg5"
ORDER = [provision.UNPROVISIONED, provision.KEYED, provision.INSTALLED, provision.TESTED,
         provision.LOCKED]
PRE_LOCK = (provision.KEYED, provision.PENDING, provision.INSTALLED, provision.TESTED)


class ProvisionerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ce-sm-")
        Path(self.dir, provision.CLAIM_FILE).write_text(CLAIM)  # the vendor's, at the factory
        self.prov = provision.Provisioner(self.dir, INFO, self_test=self.fake_self_test)
        self.model = provision.UNPROVISIONED
        self.self_test_passes = True
        self.last_cert: bytes | None = None

    def fake_self_test(self, prov: provision.Provisioner, timeout_s: int
                       ) -> tuple[bool, str, str, int]:
        """The network check the step is given (``provision_selftest.run`` on a device)."""
        assert prov is self.prov and 0 < timeout_s <= provision.SELF_TEST_MAX_S
        if not self.self_test_passes:
            return False, "tls", "OSError: handshake refused", 0
        return True, "done", "published batch 1, acknowledged", 1

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, msg: dict[int, Any]) -> dict[int, Any]:
        msg = dict(msg)
        msg[frame.F_ID] = 9
        # through the real codec both ways, as on the wire
        (decoded,) = frame.FrameDecoder().feed(frame.encode_frame(msg))
        reply = self.prov.handle(decoded)
        (back,) = frame.FrameDecoder().feed(frame.encode_frame(reply))
        assert back[frame.F_ID] == 9
        return back

    def expect(self, reply: dict[int, Any], ok_type: int, allowed: bool) -> bool:
        if allowed:
            assert reply[0] == ok_type, reply
            return True
        assert reply[0] == frame.T_ERROR, reply
        assert reply[frame.F_CODE] in (frame.E_ORDER, frame.E_LOCKED), reply
        return False

    @rule()
    def hello(self) -> None:
        r = self.send({0: frame.T_HELLO})
        assert r[frame.F_STATE] == self.model and r[frame.F_DEVICE] == URN
        # the claim secret only while the device is open
        assert r.get(frame.F_CLAIM) == (None if self.model == provision.LOCKED else CLAIM)

    @rule()
    def generate_key(self) -> None:
        r = self.send({0: frame.T_GENERATE_KEY})
        if self.expect(r, frame.T_GENERATE_KEY, self.model != provision.LOCKED):
            self.model = provision.KEYED
            self.last_cert = None

    @rule()
    def csr(self) -> None:
        r = self.send({0: frame.T_CSR})
        if self.expect(r, frame.T_CSR, self.model in PRE_LOCK):
            cert = issue_for_csr(pki().ca_key, pki().ca_cert, r[frame.F_CSR])
            self.last_cert = cert.public_bytes(Encoding.DER)

    @rule(good_cert=st.booleans())
    def install(self, good_cert: bool) -> None:
        cert = self.last_cert if good_cert and self.last_cert else os.urandom(300)
        r = self.send({0: frame.T_INSTALL, frame.F_CHAIN: [cert], frame.F_CA: [b"ca"],
                       frame.F_BROKER: {"host": "127.0.0.1", "port": 1}})
        allowed = self.model in PRE_LOCK
        if not allowed:
            self.expect(r, frame.T_INSTALL, False)
        elif cert is self.last_cert:
            assert r[0] == frame.T_INSTALL, r
            self.model = provision.INSTALLED
        else:
            assert r[0] == frame.T_ERROR and r[frame.F_CODE] == frame.E_BAD_INPUT, r

    @rule(valid=st.booleans())
    def ticket(self, valid: bool) -> None:
        """Offline: an install carrying an enrollment ticket (https needs the CA)."""
        t: dict[str, Any] = {"token": "tok", "url": "http://127.0.0.1:9/enroll/ticket",
                             "dev_http": True}
        if not valid:
            t["url"] = "https://127.0.0.1:9/enroll/ticket"  # and no CA
        r = self.send({0: frame.T_INSTALL, provision.F_TICKET: t})
        allowed = self.model in (provision.KEYED, provision.PENDING)
        if not allowed:
            self.expect(r, frame.T_INSTALL, False)
        elif valid:
            assert r[0] == frame.T_INSTALL and r[frame.F_STATE] == provision.PENDING, r
            self.model = provision.PENDING
        else:
            assert r[0] == frame.T_ERROR and r[frame.F_CODE] == frame.E_BAD_INPUT, r

    @rule(answer=st.sampled_from(["ok", "refused", "down", "garbage", "wrong-cert"]))
    def enroll_attempt(self, answer: str) -> None:
        """The boot path's retry while a ticket is pending, against a scripted fleet."""
        from cityedge_fw import enroll_http
        from cityedge_fw.provision_main import EnrollRetry

        def post(url: str, obj: dict[str, Any], ca: Any, dev_http: bool) -> tuple[int, bytes]:
            if answer == "down":
                raise OSError(111, "ECONNREFUSED")
            if answer == "garbage":
                raise enroll_http.HttpError("not an HTTP status line")
            if answer == "refused":
                return 403, b'{"detail": "the enrollment token has expired"}'
            csr = x509.load_pem_x509_csr(obj["csr_pem"].encode()).public_bytes(Encoding.DER)
            if answer == "wrong-cert":  # a certificate for another key: not installed
                name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, URN)])
                csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(
                    ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()
                ).public_bytes(Encoding.DER)
            cert = issue_for_csr(pki().ca_key, pki().ca_cert, csr)
            ca_pem = pki().ca_cert.public_bytes(Encoding.PEM).decode()
            return 200, json.dumps({
                "chain_pem": cert.public_bytes(Encoding.PEM).decode() + ca_pem,
                "ca_bundle_pem": ca_pem, "broker_url": "mqtts://127.0.0.1:8883",
                "config": {"kid": "k"}}).encode()

        retry = EnrollRetry(self.prov, post)
        if self.model != provision.PENDING:
            assert self.prov.ticket() is None
            return
        retry.run()
        event("enroll attempt: %s -> %s" % (answer, self.prov.state))
        if answer == "ok":
            self.model = provision.LOCKED
        elif answer == "refused":
            self.model = provision.KEYED

    @rule(passes=st.booleans())
    def self_test(self, passes: bool) -> None:
        self.self_test_passes = passes
        r = self.send({0: frame.T_SELF_TEST, frame.F_TIMEOUT: 5})
        if self.expect(r, frame.T_SELF_TEST, self.model in (provision.INSTALLED,
                                                             provision.TESTED)):
            assert r[frame.F_OK] is passes
            assert r[frame.F_STAGE] == ("done" if passes else "tls")
            if passes:
                self.model = provision.TESTED

    @rule()
    def lock(self) -> None:
        r = self.send({0: frame.T_LOCK})
        if self.expect(r, frame.T_LOCK, self.model == provision.TESTED):
            self.model = provision.LOCKED

    @rule(t=st.integers(-5, 300), junk=st.dictionaries(st.integers(1, 20), st.binary(
        max_size=8), max_size=3))
    def anything(self, t: int, junk: dict[int, bytes]) -> None:
        msg: dict[int, Any] = dict(junk)
        msg[0] = t
        before = self.model
        r = self.send(msg)
        if t not in frame.TYPE_NAMES or t == frame.T_ERROR:
            assert r[0] == frame.T_ERROR
        if r[0] == frame.T_ERROR:  # a refused request never changes the state
            assert self.prov.state == before
        elif t == frame.T_GENERATE_KEY:
            self.model = provision.KEYED
            self.last_cert = None
        elif t == frame.T_SELF_TEST and r.get(frame.F_OK):
            self.model = provision.TESTED
        elif t == frame.T_LOCK:
            self.model = provision.LOCKED

    @rule()
    def reboot(self) -> None:
        """Power cycle: a new Provisioner reads the same flash."""
        self.prov = provision.Provisioner(self.dir, INFO, self_test=self.fake_self_test)

    @invariant()
    def files_match_state(self) -> None:
        assert self.prov.state == self.model
        files = set(os.listdir(self.dir))
        assert not any(f.endswith(".tmp") for f in files), files
        if self.model == provision.UNPROVISIONED:
            assert "key.der" not in files
        else:
            assert "key.der" in files
            raw = Path(self.dir, provision.STATE_FILE).read_bytes()
            assert cbor.loads(raw)["state"] == self.model
        if self.model in ORDER[2:]:
            assert {"config.json", "cert.der", "ca.der"} <= files
        if self.model == provision.KEYED:
            assert "config.json" not in files
        assert (provision.TICKET_FILE in files) == (self.model == provision.PENDING), files
        assert Path(self.dir, provision.CLAIM_FILE).read_text() == CLAIM  # never rewritten


TestProvisioner = ProvisionerMachine.TestCase
TestProvisioner.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_torn_state_file_starts_over() -> None:
    d = tempfile.mkdtemp(prefix="ce-sm-")
    try:
        prov = provision.Provisioner(d, INFO)
        prov.handle({0: frame.T_GENERATE_KEY})
        with open(os.path.join(d, provision.STATE_FILE), "wb") as f:
            f.write(b"\xa1\x65sta")  # cut short by a power failure
        assert provision.Provisioner(d, INFO).state == provision.UNPROVISIONED
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_board_boot_serves_until_locked_then_boots_the_agent(tmp_path: Path) -> None:
    from cityedge_fw import provision_main

    root = str(tmp_path)
    prov = provision.Provisioner(root, INFO)
    prov.handle({0: frame.T_GENERATE_KEY})
    prov._set_state(provision.TESTED)  # as after a passed self-test
    uart = FakeUart(frame.encode_frame({0: frame.T_HELLO, frame.F_ID: 1})
                    + frame.encode_frame({0: frame.T_LOCK, frame.F_ID: 2})
                    + frame.encode_frame({0: frame.T_HELLO, frame.F_ID: 3}))
    assert provision_main.board_boot(uart, root, INFO) is True
    replies = frame.FrameDecoder().feed(bytes(uart.out))
    assert [r[frame.F_ID] for r in replies] == [1, 2]  # stopped right after the lock
    assert provision.is_locked(root)
    assert provision_main.board_boot(FakeUart(b""), root, INFO) is True  # no UART use
