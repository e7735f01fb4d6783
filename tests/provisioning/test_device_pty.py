"""Provisioning mode of the real firmware on the MicroPython unix port, over a pty, driven by
the host's ``SerialTransport`` (pyserial): the happy path, and every fault the issue lists."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import serial
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from device_pty import DeviceFactory

from cityedge_core import frame
from cityedge_provision.errors import DeviceAlreadyProvisioned, DeviceRefused, LinkError
from cityedge_provision.limits import ProvisionLimits
from cityedge_provision.transport import SerialTransport

from support.device_cert import install_fields, issue_for_csr
from support.mosquitto import Mosquitto, TestPKI

FAST = ProvisionLimits(reply_timeout_s=2.0, open_timeout_s=2.0)
URN = "urn:dev:mac:0024befffe800001"


def provision_to_installed(t: SerialTransport, pki: TestPKI, port: int) -> bytes:
    pub = t.request(frame.T_GENERATE_KEY)[frame.F_PUBLIC_KEY]
    csr_der = t.request(frame.T_CSR)[frame.F_CSR]
    req = x509.load_der_x509_csr(csr_der)
    assert req.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint) == pub
    cert = issue_for_csr(pki.ca_key, pki.ca_cert, csr_der)
    t.request(frame.T_INSTALL, install_fields(pki, cert, port))
    return bytes(pub)


def test_hello_reports_identity_and_state(make_device: DeviceFactory) -> None:
    dev = make_device("SN-00001", URN)
    with SerialTransport(dev.port, FAST) as t:
        hello = t.request(frame.T_HELLO)
    assert hello[frame.F_SERIAL] == "SN-00001"
    assert hello[frame.F_DEVICE] == URN
    assert hello[frame.F_STATE] == "unprovisioned"
    assert frame.F_KID not in hello
    assert frame.F_CLAIM not in hello  # this device left the factory without one


def test_full_device_sequence_with_self_test_then_locked(
        make_device: DeviceFactory, pki: TestPKI, mosquitto: Mosquitto) -> None:
    """... and the vendor's claim secret is told while the device is open, never once it
    is locked (nor is the file touched)."""
    claim = "k3Xv0-claim-secret-from-the-factory-0123456789"
    mosquitto.grant(URN)  # as the fleet does at enrollment: the self-test checks it
    dev = make_device("SN-00002", URN, claim=claim)
    with SerialTransport(dev.port, FAST) as t:
        assert t.request(frame.T_HELLO)[frame.F_CLAIM] == claim
        provision_to_installed(t, pki, mosquitto.port)
        assert t.request(frame.T_HELLO)[frame.F_CLAIM] == claim
        res = t.request(frame.T_SELF_TEST, {frame.F_TIMEOUT: 15}, timeout_s=25)
        assert res[frame.F_OK] is True, res
        assert res[frame.F_STAGE] == "done" and res[frame.F_SEQ] == 1
        t.request(frame.T_LOCK)
        hello = t.request(frame.T_HELLO)
        assert hello[frame.F_STATE] == "locked" and frame.F_CLAIM not in hello
        with pytest.raises(DeviceAlreadyProvisioned):
            t.request(frame.T_GENERATE_KEY)
    assert (dev.root / "claim.txt").read_text() == claim
    # what a board boots from: a config naming the installed files, the key 0600-free DER
    cfg = (dev.root / "config.json").read_text()
    assert URN in cfg and str(dev.root / "cert.der") in cfg


def test_wrong_order_is_refused_and_state_unchanged(make_device: DeviceFactory) -> None:
    dev = make_device("SN-00003", URN)
    with SerialTransport(dev.port, FAST) as t:
        for step in (frame.T_CSR, frame.T_SELF_TEST, frame.T_LOCK):
            with pytest.raises(DeviceRefused) as e:
                t.request(step)
            assert e.value.code == frame.E_ORDER
        with pytest.raises(DeviceRefused) as e:
            t.request(frame.T_INSTALL, {frame.F_CHAIN: [b"x"]})
        assert e.value.code == frame.E_ORDER
        with pytest.raises(DeviceRefused) as e:
            t.request(99)
        assert e.value.code == frame.E_UNKNOWN_TYPE
        assert t.request(frame.T_HELLO)[frame.F_STATE] == "unprovisioned"


def test_install_refuses_a_certificate_for_another_key(
        make_device: DeviceFactory, pki: TestPKI) -> None:
    dev = make_device("SN-00004", URN)
    other = pki.issue_client(URN)  # same name, another key
    with SerialTransport(dev.port, FAST) as t:
        t.request(frame.T_GENERATE_KEY)
        with pytest.raises(DeviceRefused) as e:
            t.request(frame.T_INSTALL, install_fields(pki, other.cert, 1883))
        assert e.value.code == frame.E_BAD_INPUT and "not for this device" in str(e.value)
        assert t.request(frame.T_HELLO)[frame.F_STATE] == "keyed"
    assert not (dev.root / "config.json").exists()


def raw_exchange(port: str, data: bytes, wait_s: float = 1.0) -> list[object]:
    with serial.Serial(port, 115200, timeout=0.05) as s:
        s.write(data)
        dec = frame.FrameDecoder()
        out: list[object] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            out.extend(dec.feed(s.read(4096)))
        return out


def test_garbage_and_oversize_get_error_frames_and_the_device_keeps_serving(
        make_device: DeviceFactory) -> None:
    dev = make_device("SN-00005", URN)
    hello = frame.encode_frame({0: frame.T_HELLO, frame.F_ID: 7})
    oversize = frame.MAGIC + b"\xff\xff" + os.urandom(300)
    bad_crc = bytearray(hello)
    bad_crc[5] ^= 0xFF
    replies = raw_exchange(dev.port, b"\x00garbage\r\n" + oversize + bytes(bad_crc) + hello)
    codes = {m[frame.F_CODE] for m in replies if isinstance(m, dict)
             and m[0] == frame.T_ERROR}
    assert {frame.E_GARBAGE, frame.E_OVERSIZE, frame.E_CRC} <= codes, replies
    answers = [m for m in replies if isinstance(m, dict) and m[0] == frame.T_HELLO]
    assert [m[frame.F_ID] for m in answers] == [7]
    assert dev.alive()


def test_transport_resends_after_the_device_reports_a_corrupted_frame(
        make_device: DeviceFactory) -> None:
    dev = make_device("SN-00006", URN)
    with SerialTransport(dev.port, FAST) as t:
        t.ensure_connected()
        assert t._line is not None
        real_write = t._line.write
        calls = []

        def flaky(data: bytes) -> int | None:
            calls.append(data)
            if len(calls) == 1:  # the first request is hit by noise on the line
                data = data[:6] + bytes([data[6] ^ 0x55]) + data[7:]
            return real_write(data)

        t._line.write = flaky  # type: ignore[method-assign]
        assert t.request(frame.T_HELLO)[frame.F_SERIAL] == "SN-00006"
        assert t.retries == 1 and len(calls) == 2


def test_silent_device_times_out_with_a_clear_message(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        t = SerialTransport(os.ttyname(slave), FAST)
        t0 = time.monotonic()
        with pytest.raises(LinkError) as e:
            t.request(frame.T_HELLO, timeout_s=1.0)
        assert 0.9 < time.monotonic() - t0 < 3
        assert "did not answer hello within 1 s" in str(e.value)
        assert "provisioning mode" in e.value.hint
        t.close()
    finally:
        os.close(master)
        os.close(slave)


def test_missing_port_is_a_link_error() -> None:
    with pytest.raises(LinkError) as e:
        SerialTransport("/dev/cityedge-no-such-port", FAST).ensure_connected()
    assert "cannot open /dev/cityedge-no-such-port" in str(e.value)


def test_cable_pulled_mid_step_then_resume_on_a_new_line(
        make_device: DeviceFactory, pki: TestPKI) -> None:
    dev = make_device("SN-00007", URN)
    with SerialTransport(dev.port, FAST) as t:
        t.request(frame.T_GENERATE_KEY)
        dev.kill()  # the cable is pulled: the device's side of the line is gone
        with pytest.raises(LinkError) as e:
            t.request(frame.T_CSR)
        assert "lost" in str(e.value) or "did not answer" in str(e.value)
    again = make_device("SN-00007", URN, root=dev.root)  # plugged in again, same flash
    with SerialTransport(again.port, FAST) as t:
        hello = t.request(frame.T_HELLO)
        assert hello[frame.F_STATE] == "keyed" and isinstance(hello[frame.F_KID], bytes)
        assert x509.load_der_x509_csr(t.request(frame.T_CSR)[frame.F_CSR]).is_signature_valid


def test_locked_device_opens_only_for_a_signed_unlock_command(
        make_device: DeviceFactory, pki: TestPKI, mosquitto: Mosquitto) -> None:
    from cityedge_core import cose, p256
    from cityedge_core.command import encode_command

    fleet_key = p256.PrivateKey(0xC0FFEE1234)
    fleet_pub = fleet_key.public_key().to_sec1()
    fleet_kid = cose.kid_for_public_key(fleet_pub)
    rogue = p256.PrivateKey(0xBAD5EED)
    mosquitto.grant(URN)
    dev = make_device("SN-00010", URN)
    expires = int(time.time()) + 300
    with SerialTransport(dev.port, FAST) as t:
        t.request(frame.T_GENERATE_KEY)
        csr_der = t.request(frame.T_CSR)[frame.F_CSR]
        cert = issue_for_csr(pki.ca_key, pki.ca_cert, csr_der)
        t.request(frame.T_INSTALL, install_fields(pki, cert, mosquitto.port, [fleet_pub]))
        assert t.request(frame.T_SELF_TEST, {frame.F_TIMEOUT: 10}, timeout_s=20)[frame.F_OK]
        t.request(frame.T_LOCK)
        forged = encode_command(rogue, fleet_kid, "unlock", URN, 1, expires)
        other_device = encode_command(fleet_key, fleet_kid, "unlock", URN + "0", 2, expires)
        not_unlock = encode_command(fleet_key, fleet_kid, "reboot", URN, 3, expires)
        for cmd in (forged, other_device, not_unlock, b"\xa0"):
            with pytest.raises(DeviceRefused) as e:
                t.request(frame.T_UNLOCK, {frame.F_COMMAND: cmd})
            assert e.value.code == frame.E_BAD_INPUT
            assert t.request(frame.T_HELLO)[frame.F_STATE] == "locked"
        good = encode_command(fleet_key, fleet_kid, "unlock", URN, 4, expires)
        assert t.request(frame.T_UNLOCK, {frame.F_COMMAND: good})[frame.F_STATE] == "tested"
        t.request(frame.T_LOCK)
        with pytest.raises(DeviceRefused) as e:  # the same command again: a replay
            t.request(frame.T_UNLOCK, {frame.F_COMMAND: good})
        assert "replay" in str(e.value)
        assert t.request(frame.T_HELLO)[frame.F_STATE] == "locked"


def test_transport_asks_again_when_the_reply_arrives_corrupted(
        make_device: DeviceFactory) -> None:
    dev = make_device("SN-00011", URN)
    with SerialTransport(dev.port, FAST) as t:
        t.ensure_connected()
        assert t._line is not None
        real_read = t._line.read
        hits = []

        def flaky(n: int = 1) -> bytes:
            data = real_read(n)
            if data and not hits:  # the first reply is hit by noise
                hits.append(1)
                data = data[:-1] + bytes([data[-1] ^ 0x01])
            return data

        t._line.read = flaky  # type: ignore[method-assign]
        assert t.request(frame.T_HELLO)[frame.F_SERIAL] == "SN-00011"
        assert t.retries == 1
