"""``trust-update`` on the MicroPython agent end to end: the real agent on the unix port
(code in ROMFS, ``fw_harness.HEAP``) against a real mTLS Mosquitto, rebooting as a board
does (``fw_harness.RebootingDevice``). The offline root is the CA the device trusts
(``tls.ca``: the test PKI's CA key signs the statements), the fleet's command keys are A
(provisioned) and B (announced).

- A statement of the root, in a ``trust-update`` signed by A: the agent keeps it and
  resets, the boot checks and installs it, the answer (``ok``) is kept on flash and sent
  when the fleet sends the command again; from then on B's commands are obeyed, and once
  a later statement drops A, A's are not (refused, unanswered).
- The attacks, each in a command the gate takes (signed by a key trusted now), each
  answered ``refused`` with the reason and nothing installed: a forged statement (another
  key under the root's kid), one signed by a retired key (the fleet key A, or an old root),
  a rollback to an older statement, a truncated one, garbage CBOR.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fw_harness import DEVICE, RebootingDevice, Subscriber, device_config, wait_for
from mp_fleet import fleet_publisher
from ota_harness import FleetUpdateCommands

from cityedge_core import command, cose, trust_statement
from cityedge_core.command_decode import decode_result
from cityedge_fw import trust_check
from cityedge_host.crypto import EcSigner, EcVerifier, public_sec1

from support.mosquitto import Mosquitto, TestPKI


def statement(root: EcSigner, version: int, keys: list[tuple[EcSigner, int | None]],
              kid: bytes | None = None) -> bytes:
    now = int(time.time())
    return trust_statement.encode_statement(
        root, kid or root.kid, version, [(public_sec1(k.public_key), u) for k, u in keys],
        now - 60, now + 3600)


RESEND_S = 3.0  # seconds between the fleet's sends of a command not answered yet


class Fleet:
    """The fleet's side: its command keys, the publisher, the observer of results."""

    def __init__(self, tmp: Path, broker: Mosquitto, pki: TestPKI) -> None:
        self.a = EcSigner.generate()
        self.b = EcSigner.generate()
        self.root = EcSigner(pki.ca_key)  # the CA the device trusts is the offline root
        self.creds = pki.issue_client(DEVICE)
        broker.grant(DEVICE)
        self.seed = tmp / "fleet_a.pub"
        self.seed.write_bytes(public_sec1(self.a.public_key))
        self.sub = Subscriber(broker, pki)
        self.pub = fleet_publisher(broker, pki)
        self.rules = FleetUpdateCommands(self.creds)
        self.verifier = EcVerifier(self.creds.key.public_key())
        self.seq = 0

    def send(self, key: EcSigner, name: str, args: Any = None, seq: int | None = None
             ) -> tuple[int, bytes]:
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.rules.sent(seq, name)
        data = command.encode_command(key, key.kid, name, DEVICE, seq,
                                      int(time.time()) + 600, args)
        self.resend(data)
        return seq, data

    def resend(self, data: bytes) -> None:
        info = self.pub.publish("ce/v1/%s/down/cmd" % DEVICE, data, qos=1)
        info.wait_for_publish(10)

    def answers(self, seq: int) -> list[Any]:
        return [decode_result(d, self.verifier) for d in self.sub.results()
                if decode_result(d, self.verifier).seq == seq]

    def close(self) -> None:
        self.pub.disconnect()
        self.pub.loop_stop()
        self.sub.close()


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: Mosquitto, pki: TestPKI) -> Any:
    f = Fleet(tmp_path, mosquitto, pki)
    yield f
    f.close()


def answer(fleet: Fleet, dev: RebootingDevice, seq: int, data: bytes,
           timeout: float = 150) -> Any:
    """The device's answer to ``seq``, the command ``data`` sent again every few seconds
    as the fleet does until it has one (the check runs at the next boot; its answer is
    kept on flash and sent for the resend). Taken by the fleet's result rules. The answers
    are looked for every 0.05 s, not only before each resend: one that came a moment after
    a resend was otherwise found up to 3 s late."""
    deadline = time.monotonic() + timeout
    resend_at = time.monotonic()
    while time.monotonic() < deadline:
        found = fleet.answers(seq)
        if found:
            raw = next(d for d in fleet.sub.results()
                       if decode_result(d, fleet.verifier).seq == seq)
            assert fleet.rules.take(raw) == "result", found[0]
            return found[0]
        if time.monotonic() >= resend_at:
            fleet.resend(data)
            resend_at = time.monotonic() + RESEND_S
        time.sleep(0.05)
    dev.stop()  # its last boot's RESULT (mem_errors, last_error) into the log
    raise AssertionError("no answer to %d\n%s" % (seq, dev.log()))


def test_trust_update_installs_the_roots_statement_and_attacks_are_refused(
        fleet: Fleet, mosquitto: Mosquitto, pki: TestPKI, mpy_dir: Path, tmp_path: Path
        ) -> None:
    stop = tmp_path / "stop"
    config = device_config(tmp_path, mosquitto, pki, fleet.creds,
                           {"file": str(stop), "drain": False}, clock=True,
                           fleet_keys=(str(fleet.seed),))
    trust = tmp_path / "state.cbor.trust"
    dev = RebootingDevice(mpy_dir, config, stop).start()
    try:
        wait_for(lambda: len(fleet.sub.readings()) >= 1, 60)
        # B announced by the root, A kept for an hour (the overlap), sent under A
        v1 = statement(fleet.root, 1, [(fleet.b, None), (fleet.a, int(time.time()) + 3600)])
        seq, data = fleet.send(fleet.a, "trust-update", {1: v1})
        res = answer(fleet, dev, seq, data)
        assert (res.name, res.outcome) == ("trust-update", "ok"), res
        assert "v1 installed" in res.detail, res
        held = trust_check.installed(str(trust))
        assert held is not None and held[0] == 1 and held[2] == v1
        # B is obeyed now (and A still, in its overlap)
        seq, data = fleet.send(fleet.b, "status")
        assert answer(fleet, dev, seq, data).outcome == "ok"
        # the same statement again (a lost answer): ok, nothing changes
        seq, data = fleet.send(fleet.b, "trust-update", {1: v1})
        res = answer(fleet, dev, seq, data)
        assert (res.outcome, res.detail) == ("ok", "trust statement already installed")

        # the attacks, each in a command B signs (the gate takes it), each refused
        other_root = EcSigner.generate()
        attacks = [
            ("forged", statement(EcSigner.generate(), 2, [(fleet.b, None)],
                                 kid=fleet.root.kid), "signature"),
            ("signed_by_the_retired_fleet_key", statement(fleet.a, 2, [(fleet.a, None)]),
             "not by the root"),
            ("signed_by_a_retired_root", statement(other_root, 2, [(fleet.a, None)]),
             "not by the root"),
            ("truncated", v1[:-7], "statement"),
            ("garbage_cbor", b"\xff\x00\x9f garbage", "statement"),
            ("rollback", v1, None),  # checked below, after v2
        ]
        for case, st, reason in attacks[:-1]:
            before = trust.read_bytes()
            seq, data = fleet.send(fleet.b, "trust-update", {1: st})
            res = answer(fleet, dev, seq, data)
            assert res.outcome == "refused" and reason in res.detail, (case, res)
            assert trust.read_bytes() == before, case  # nothing installed
        # v2 drops A: A's commands are not obeyed any more
        v2 = statement(fleet.root, 2, [(fleet.b, None)])
        seq, data = fleet.send(fleet.b, "trust-update", {1: v2})
        assert answer(fleet, dev, seq, data).outcome == "ok"
        assert trust_check.installed(str(trust))[0] == 2
        # a rollback to v1 (which still lists A), sent by a thief holding A: A is not
        # trusted any more (refused by the gate, not answered); sent under B: refused
        seq_a, _ = fleet.send(fleet.a, "trust-update", {1: v1})
        seq, data = fleet.send(fleet.b, "trust-update", {1: v1})
        res = answer(fleet, dev, seq, data)
        assert res.outcome == "refused" and "rollback" in res.detail, res
        assert trust_check.installed(str(trust))[0] == 2
        assert fleet.answers(seq_a) == []  # A's command: not taken, not answered
        seq, data = fleet.send(fleet.b, "trust-update", {"x": 1})  # no statement at all
        res = answer(fleet, dev, seq, data)
        assert res.outcome == "refused" and "statement (1)" in res.detail, res
    finally:
        dev.stop()
    log = dev.log()
    assert "Traceback" not in log and "MemoryError" not in log, log
    assert "trust-update 1: ok: trust statement v1 installed" in log, log


@pytest.mark.parametrize("second_boot_has_heap", [True, False])
def test_a_verdict_with_no_heap_left_to_sign_it_is_answered_at_the_next_boot(
        tmp_path: Path, pki: TestPKI, monkeypatch: pytest.MonkeyPatch,
        second_boot_has_heap: bool) -> None:
    """``boot_answer.run`` at boot: the check installs the statement, then signing the
    answer runs out of heap (as a 72 KiB board's cut-up heap can): the verdict is kept in
    place of the statement, and the next boot signs and keeps that same answer (the
    fleet's resend gets it); a boot that cannot sign even then drops it, no boot loop."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cityedge_fw import answers, boot_answer

    private = ec.generate_private_key(ec.SECP256R1())
    device_key = EcSigner(private)
    key_file = tmp_path / "device.key.der"
    key_file.write_bytes(private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    state = tmp_path / "state.cbor"
    cfg = {"store": {"state": str(state)},
           "tls": {"ca": str(pki.ca_der), "key": str(key_file)}}
    st = statement(EcSigner(pki.ca_key), 1, [(EcSigner.generate(), None)])
    pending = Path(str(state) + ".trust.new")
    dev = DEVICE.encode()
    pending.write_bytes(bytes([len(dev)]) + dev + (7).to_bytes(8, "big")
                        + int(time.time()).to_bytes(8, "big") + st)
    real_encode = answers._encode
    fail = [True]

    def encode(*a: Any, **kw: Any) -> bytes:
        if fail[0]:
            raise MemoryError
        return real_encode(*a, **kw)

    monkeypatch.setattr(answers, "_encode", encode)
    assert boot_answer.run(cfg) is True
    assert trust_check.installed(str(state) + ".trust")[0] == 1  # installed at once
    assert pending.read_bytes()[:1] == b"\x00"  # the verdict waits, the answer not kept
    assert answers._kept(boot_answer._Signer(DEVICE, None, b"", str(state))) == []
    fail[0] = not second_boot_has_heap
    assert boot_answer.run(cfg) is True
    assert not pending.exists()  # never asked again: no boot loop
    kept = answers._kept(boot_answer._Signer(DEVICE, None, b"", str(state)))
    if not second_boot_has_heap:
        assert kept == []
        return
    assert [s for s, _ in kept] == [7]
    res = decode_result(kept[0][1], EcVerifier(device_key.public_key))
    assert (res.seq, res.name, res.outcome, res.detail) == (
        7, "trust-update", "ok", "trust statement v1 installed")


def test_the_statement_limits_are_the_cores() -> None:
    from cityedge_fw import answers

    assert answers._STATEMENT_MAX == trust_statement.STATEMENT_MAX_BYTES
    assert trust_check.NO_END == trust_statement.TIME_MAX


def test_the_root_point_is_read_from_the_device_ca_certificate(pki: TestPKI) -> None:
    point = trust_check.root_point(pki.ca_der.read_bytes())
    assert point == public_sec1(pki.ca_key.public_key())
    raw = pki.ca_der.read_bytes()
    for cut in (0, 10, 200, len(raw) - 80):
        with pytest.raises(ValueError):
            trust_check.root_point(raw[:cut])
    assert cose.kid_for_public_key(point) == EcSigner(pki.ca_key).kid


@pytest.mark.parametrize("case", ["the_roots", "not_the_roots", "garbage"])
def test_enrollment_installs_the_statement_the_fleet_hands_out(
        tmp_path: Path, pki: TestPKI, case: str) -> None:
    """The device's own enrollment (an offline ticket, ``finish_enrollment``): the
    fleet's answer carries its newest statement (``EnrollResponse.trust_statement``);
    the device installs it if the root (the CA bundle's root) signed it, so it starts
    at that version with those keys; anything else is not installed (the ticket's keys
    stay its trust)."""
    import base64

    from cryptography.hazmat.primitives import serialization

    from cityedge_core import frame
    from cityedge_fw import keys, provision

    from support.device_cert import issue_for_csr

    info = {"model": "ce-sim-1", "serial": "SN-T", "device": DEVICE, "firmware": "0.1.0"}
    prov = provision.Provisioner(str(tmp_path), info)
    prov.handle({0: frame.T_GENERATE_KEY})
    a, b = EcSigner.generate(), EcSigner.generate()
    prov.store_ticket({"token": "t", "url": "http://127.0.0.1:9/enroll/ticket",
                       "dev_http": True, "fleet_keys": [public_sec1(a.public_key)]})
    ticket = prov.ticket()
    csr = prov.handle({0: frame.T_CSR})[frame.F_CSR]
    cert = issue_for_csr(pki.ca_key, pki.ca_cert, csr)
    signer = EcSigner(pki.ca_key) if case == "the_roots" else EcSigner.generate()
    st = statement(signer, 3, [(b, None)]) if case != "garbage" else b"\xa1\x01\xff"
    pem = serialization.Encoding.PEM
    prov.finish_enrollment(ticket, {
        "chain_pem": cert.public_bytes(pem).decode(),
        "ca_bundle_pem": pki.ca_cert.public_bytes(pem).decode(),
        "broker_url": "mqtts://127.0.0.1:8883",
        "trust_statement": base64.b64encode(st).decode()})
    assert provision.is_locked(str(tmp_path))
    cfg = prov.config()
    trust = cfg["store"]["state"] + ".trust"
    got = keys.load_fleet_keys(cfg["fleet_keys"], trust)
    if case == "the_roots":
        assert trust_check.installed(trust)[0] == 3
        assert list(got) == [b.kid]  # the statement's keys, not the ticket's seed
    else:
        assert trust_check.installed(trust) is None
        assert list(got) == [a.kid]
