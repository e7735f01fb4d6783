"""The device's self-test (``cityedge_fw.provision_selftest``: the agent's own MQTT link, once)
against the real Mosquitto: every way it fails is reported with the stage the technician's
tool shows (``connect``, ``tls``, ``publish``), and a device that failed stays open
(``installed``: no lock). The firmware runs on the MicroPython unix port over a pty."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from device_pty import DeviceFactory

from cityedge_core import frame
from cityedge_provision.errors import DeviceRefused
from cityedge_provision.limits import ProvisionLimits
from cityedge_provision.transport import SerialTransport

from support.device_cert import install_fields, issue_for_csr
from support.mosquitto import Mosquitto, TestPKI, free_port

FAST = ProvisionLimits(reply_timeout_s=2.0, open_timeout_s=2.0)
URN = "urn:dev:mac:0024befffe800131"


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A port that takes TCP connections (the kernel's backlog) and never says a word."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield s.getsockname()[1]
    s.close()


def install(t: SerialTransport, issuer: TestPKI, trusted: TestPKI, port: int) -> None:
    """Key, CSR, and a certificate from ``issuer``; the device trusts ``trusted``'s CA."""
    t.request(frame.T_GENERATE_KEY)
    cert = issue_for_csr(issuer.ca_key, issuer.ca_cert, t.request(frame.T_CSR)[frame.F_CSR])
    t.request(frame.T_INSTALL, install_fields(trusted, cert, port))


CASES = {  # case: (stage, words the message has)
    "broker down": ("connect", "ECONNREFUSED"),
    "device trusts another CA": ("tls", "trusted CA"),  # mbedTLS's words
    "broker does not trust the device's CA": ("tls", "OSError"),  # the broker hung up
    "broker never answers": ("tls", "no answer within 3 s"),
    "broker's rules do not take the device": ("publish", "down/cmd"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_self_test_names_the_stage_that_failed(
        case: str, make_device: DeviceFactory, pki: TestPKI, mosquitto: Mosquitto,
        silent_broker: int, tmp_path: Path) -> None:
    """The last case is an ACL refusal: Mosquitto acknowledges a QoS 1 PUBLISH its rules
    refuse (MQTT 3.1.1 has no negative PUBACK), so the self-test's SUBSCRIBE to the
    device's command topic is what shows it (SUBACK 0x80)."""
    rogue = TestPKI(tmp_path / "rogue", ca_name="rogue CA")
    issuer, trusted, port = {
        "broker down": (pki, pki, free_port()),
        "device trusts another CA": (pki, rogue, mosquitto.port),
        "broker does not trust the device's CA": (rogue, pki, mosquitto.port),
        "broker never answers": (pki, pki, silent_broker),
        "broker's rules do not take the device": (pki, pki, mosquitto.port),  # no grant
    }[case]
    stage, words = CASES[case]
    dev = make_device("SN-00131", URN)
    with SerialTransport(dev.port, FAST) as t:
        install(t, issuer, trusted, port)
        res = t.request(frame.T_SELF_TEST, {frame.F_TIMEOUT: 3}, timeout_s=15)
        assert res[frame.F_OK] is False, res
        assert res[frame.F_STAGE] == stage, res
        assert words in res[frame.F_MESSAGE], res
        assert t.request(frame.T_HELLO)[frame.F_STATE] == "installed"
        with pytest.raises(DeviceRefused) as e:
            t.request(frame.T_LOCK)  # an untested device stays open
        assert e.value.code == frame.E_ORDER
    assert "MemoryError" not in dev.read_log()


def test_self_test_passes_once_the_broker_takes_the_device(
        make_device: DeviceFactory, pki: TestPKI, mosquitto: Mosquitto) -> None:
    """Refused at ``publish`` while the device is not granted; granted, the same device
    (same process: the TLS context's heap block is kept again for the second run) passes
    with the next batch of its chain, and may lock."""
    dev = make_device("SN-00132", URN)
    with SerialTransport(dev.port, FAST) as t:
        install(t, pki, pki, mosquitto.port)
        first = t.request(frame.T_SELF_TEST, {frame.F_TIMEOUT: 10}, timeout_s=20)
        assert (first[frame.F_OK], first[frame.F_STAGE], first[frame.F_SEQ]) == (
            False, "publish", 1), first  # batch 1 was sent (and dropped by the broker)
        mosquitto.grant(URN)
        second = t.request(frame.T_SELF_TEST, {frame.F_TIMEOUT: 10}, timeout_s=20)
        assert (second[frame.F_OK], second[frame.F_STAGE], second[frame.F_SEQ]) == (
            True, "done", 2), second
        assert second[frame.F_MESSAGE] == "published batch 2, acknowledged"
        assert t.request(frame.T_LOCK)[frame.F_STATE] == "locked"
    log = dev.read_log()
    assert log.count("with the link up") == 1 and "MemoryError" not in log, log
