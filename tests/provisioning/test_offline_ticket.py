"""Offline provisioning where the device enrolls itself: the laptop hands it a ticket
(``--dev-http-enroll``: the test fleet is plain HTTP on loopback), the device retries
``/enroll/ticket`` from its boot path until the fleet answers. Real firmware on the
MicroPython unix port over a pty, the real fleet (SQLite, uvicorn), the real Mosquitto."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import check_expected, run_cli
from device_pty import DeviceFactory, PtyDevice, boot_agent
from fleet_server import FleetServer, installed_fleet_keys
from sqlalchemy import update
from sqlmodel import Session, select

from cityedge_core import frame
from cityedge_fleet import enrollment
from cityedge_fleet.models import AuditRecord, Credential, Device, EnrollmentToken, Reading
from cityedge_provision.fleet_client import Workspace
from cityedge_provision.transport import SerialTransport

from support.mosquitto import Mosquitto, TestPKI, free_port

ENROLL_WAIT_S = 30.0  # seconds a device may take to enroll once the fleet is up

class Fleets:
    """The fleet on one fixed URL that a test can take down and bring back (same DB)."""

    def __init__(self, base: Path, pki: TestPKI, broker: int) -> None:
        self.base, self.pki, self.broker = base, pki, broker
        self.port = free_port()
        self.current: FleetServer | None = None

    def up(self) -> FleetServer:
        assert self.current is None
        self.current = FleetServer(self.base, self.pki, self.broker, self.port).start()
        return self.current

    def down(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port


@pytest.fixture
def fleets(tmp_path: Path, pki: TestPKI, mosquitto: Mosquitto) -> Iterator[Fleets]:
    f = Fleets(tmp_path / "fleet", pki, mosquitto.port)
    yield f
    f.down()


def hello_state(port: str) -> str:
    with SerialTransport(port) as t:
        return str(t.request(frame.T_HELLO)[frame.F_STATE])


def creds(engine: object, urn: str) -> list[Credential]:
    with Session(engine) as s:  # type: ignore[call-overload]
        return list(s.exec(select(Credential).where(Credential.device_id == urn)).all())


def wait_locked(dev: PtyDevice, timeout_s: float = ENROLL_WAIT_S) -> None:
    """The unix port's provisioning mode exits once the device enrolled and locked."""
    assert dev.proc is not None
    try:
        dev.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError("the device did not enroll itself:\n" + dev.read_log()) from None
    state = (dev.root / "provision.cbor").read_bytes()
    assert b"locked" in state, (dev.proc.returncode, dev.read_log())


def provision_offline(fleets: Fleets, home: Path, dev: PtyDevice, site: str) -> str:
    res = run_cli(["provision", "--port", dev.port, "--offline", "--yes", "--site", site,
                   "--dev-http-enroll"], home)
    assert res.exit_code == 0, res.output
    assert "the device enrolls itself at %s/enroll/ticket" % fleets.url in res.output
    return res.output


def tokens(fleet: FleetServer, home: Path, serial: str) -> None:
    Workspace(home).save_login(fleet.url, fleet.token())
    res = run_cli(["provision", "tokens", serial], home)
    assert res.exit_code == 0, res.output


def test_device_enrolls_itself_after_reboot_when_the_fleet_comes_back(
        make_device: DeviceFactory, fleets: Fleets, fw_mpy: Path, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    urn, serial = "urn:dev:mac:0024befffe800901", "SN-00901"
    tokens(fleets.up(), home, serial)
    fleets.down()  # the cellar: neither the laptop nor the device reach the fleet
    dev = make_device(serial, urn)
    provision_offline(fleets, home, dev, "cellar")
    assert hello_state(dev.port) == "pending-enrollment"
    dev.stop()  # power cycle: the ticket is on flash
    dev = make_device(serial, urn, root=dev.root)
    time.sleep(3.0)  # a few attempts fail against the missing fleet
    assert dev.alive()
    fleet = fleets.up()
    fleet.start_ingest()
    t0 = time.monotonic()
    wait_locked(dev)
    took = time.monotonic() - t0
    log = dev.read_log()
    assert "enroll: attempt 1 failed (OSError" in log, log
    assert "enrolled after" in log
    print("device enrolled %.1f s after the fleet came back" % took)
    with Session(fleet.app.state.engine) as s:
        row = s.get(Device, urn)
        assert row is not None and row.state == "provisioned" and row.site == "cellar"
    cs = creds(fleet.app.state.engine, urn)
    assert len(cs) == 1
    cfg = json.loads((dev.root / "config.json").read_text())
    assert cfg["fleet"]["kid"] == cs[0].kid and cfg["broker"]["port"] == fleet.settings.mqtt_port
    # the fleet keys came with the ticket (fetched with the tokens): the device obeys the fleet
    assert installed_fleet_keys(dev.root, cfg) == fleet.trust_store()
    assert not (dev.root / "ticket.cbor").exists()
    # the agent boots from what the device installed itself and streams verified readings
    boot_agent(cfg, fw_mpy, tmp_path)

    def seqs() -> set[int]:
        with Session(fleet.app.state.engine) as s:
            return {r.batch_seq for r in s.exec(select(Reading).where(
                Reading.device_id == urn, Reading.status == "ok")).all()}

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(seqs()) < 2:
        time.sleep(0.1)
    got = seqs()  # the agent keeps streaming: how many arrived depends on the machine's speed
    assert len(got) >= 2 and got == set(range(1, max(got) + 1)), got
    # the laptop's sync later finds the token used by the device: same credential
    res = run_cli(["provision", "sync"], home)
    assert res.exit_code == 0, res.output
    assert "enrolled by the device itself" in res.output
    assert len(creds(fleet.app.state.engine, urn)) == 1


def test_sync_first_then_the_device_fetches_the_same_certificate(
        make_device: DeviceFactory, fleets: Fleets, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    urn, serial = "urn:dev:mac:0024befffe800902", "SN-00902"
    tokens(fleets.up(), home, serial)
    fleets.down()
    dev = make_device(serial, urn)
    provision_offline(fleets, home, dev, "depot")
    dev.stop()  # the device stays off while the technician syncs
    fleet = fleets.up()
    res = run_cli(["provision", "sync"], home)
    assert res.exit_code == 0, res.output
    assert "certificate issued" in res.output
    dev = make_device(serial, urn, root=dev.root)
    wait_locked(dev)
    cs = creds(fleet.app.state.engine, urn)
    assert len(cs) == 1 and cs[0].status == "active"
    assert json.loads((dev.root / "config.json").read_text())["fleet"]["kid"] == cs[0].kid
    # the technician's next visit finds the device done by itself
    dev.stop()
    dev = make_device(serial, urn, root=dev.root)
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 0, res.output
    assert "locked already" in res.output
    assert len(creds(fleet.app.state.engine, urn)) == 1


def test_device_with_fleet_up_enrolls_at_once_and_sync_agrees(
        make_device: DeviceFactory, fleets: Fleets, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    urn, serial = "urn:dev:mac:0024befffe800903", "SN-00903"
    fleet = fleets.up()
    tokens(fleet, home, serial)
    dev = make_device(serial, urn)
    out = provision_offline(fleets, home, dev, "roof")  # the laptop is offline, the device
    check_expected("offline_ticket", out)              # is not
    wait_locked(dev)
    assert "enrolled after 0 failed attempt(s)" in dev.read_log()
    res = run_cli(["provision", "sync"], home)
    assert res.exit_code == 0 and "enrolled by the device itself" in res.output, res.output
    check_expected("sync_ticket", res.output)
    assert len(creds(fleet.app.state.engine, urn)) == 1


def test_expired_token_drops_the_ticket_and_waits_for_the_technician(
        make_device: DeviceFactory, fleets: Fleets, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    urn, serial = "urn:dev:mac:0024befffe800904", "SN-00904"
    fleet = fleets.up()
    tokens(fleet, home, serial)
    with Session(fleet.app.state.engine) as s:  # the token expires at the fleet
        s.execute(update(EnrollmentToken).values(
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        s.commit()
    dev = make_device(serial, urn)
    provision_offline(fleets, home, dev, "pier")
    deadline = time.monotonic() + ENROLL_WAIT_S
    while "refused the ticket" not in dev.read_log() and time.monotonic() < deadline:
        time.sleep(0.1)
    # the device is told only that it was refused; the fleet's audit log says why
    assert "enrollment refused" in dev.read_log(), dev.read_log()
    assert dev.alive() and hello_state(dev.port) == "keyed"  # serving the UART again
    assert not (dev.root / "ticket.cbor").exists()
    assert creds(fleet.app.state.engine, urn) == []
    with Session(fleet.app.state.engine) as s:
        assert s.get(Device, urn) is None  # an expired token registers nothing
        refused = s.exec(select(AuditRecord).where(
            AuditRecord.action == "enroll.ticket")).all()
        assert refused and all("the enrollment token has expired" in r.detail
                               for r in refused)


class GarbageServer:
    """Answers every connection with bytes that are not HTTP; counts the connections."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.times.append(time.monotonic())
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"\x00\xffSSH-2.0-not-http\r\n\r\n garbage")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_garbage_from_the_fleet_url_is_retried_with_growing_backoff(
        make_device: DeviceFactory, fleets: Fleets, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    urn, serial = "urn:dev:mac:0024befffe800905", "SN-00905"
    tokens(fleets.up(), home, serial)
    fleets.down()
    garbage = GarbageServer(fleets.port)  # something else answers on the fleet's URL
    try:
        dev = make_device(serial, urn)
        provision_offline(fleets, home, dev, "quay")
        time.sleep(7.0)
        times = list(garbage.times)
    finally:
        garbage.close()
    assert 2 <= len(times) <= 4, times  # retried, but backing off (2 s doubling, jitter)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.9 for g in gaps), gaps
    assert "HttpError: not an HTTP status line" in dev.read_log(), dev.read_log()
    assert dev.alive() and hello_state(dev.port) == "pending-enrollment"


def test_https_fleet_the_device_verifies_with_the_tickets_ca(
        make_device: DeviceFactory, pki: TestPKI, mosquitto: Mosquitto,
        tmp_path: Path) -> None:
    """The production shape: the fleet on HTTPS, the device checks its certificate against
    the CA in the ticket (``--fleet-ca``); a ticket with the wrong CA never enrolls."""
    fleet = FleetServer(tmp_path / "fleet", pki, mosquitto.port, tls=True).start()
    try:
        home = tmp_path / "laptop"
        ws = Workspace(home)
        ws.save_login(fleet.url, fleet.token())
        with Session(fleet.app.state.engine) as s:  # tokens fetched earlier (in-process:
            got = {}                                # the laptop's httpx lacks the test CA)
            for serial in ("SN-00911", "SN-00912"):
                row, tok = enrollment.issue_token(s, serial=serial, ttl_s=3600,
                                                  created_by="tech")
                got[serial] = {"token": tok, "expires_at": row.expires_at.isoformat()}
            s.commit()
        ws.save_tokens(got)
        other = TestPKI(tmp_path / "other-ca", ca_name="not the fleet's CA")
        wrong = make_device("SN-00912", "urn:dev:mac:0024befffe800912")
        res = run_cli(["provision", "--port", wrong.port, "--offline", "--yes",
                       "--fleet-ca", str(other.ca_pem)], home)
        assert res.exit_code == 0, res.output
        good = make_device("SN-00911", "urn:dev:mac:0024befffe800911")
        res = run_cli(["provision", "--port", good.port, "--offline", "--yes",
                       "--fleet-ca", str(pki.ca_pem)], home)
        assert res.exit_code == 0, res.output
        assert "enrolls itself at %s/enroll/ticket" % fleet.url in res.output
        wait_locked(good)
        assert len(creds(fleet.app.state.engine, "urn:dev:mac:0024befffe800911")) == 1
        assert wrong.alive() and hello_state(wrong.port) == "pending-enrollment"
        assert "failed (TlsError: The certificate is not correctly signed" in wrong.read_log()
        assert creds(fleet.app.state.engine, "urn:dev:mac:0024befffe800912") == []
    finally:
        fleet.stop()


def test_technician_returns_online_after_the_device_enrolled_itself(
        make_device: DeviceFactory, fleets: Fleets, tmp_path: Path) -> None:
    """No `sync`: the next visit online records the device's own enrollment and is done."""
    home = tmp_path / "laptop"
    urn, serial = "urn:dev:mac:0024befffe800906", "SN-00906"
    fleet = fleets.up()
    tokens(fleet, home, serial)
    dev = make_device(serial, urn)
    provision_offline(fleets, home, dev, "bridge")
    wait_locked(dev)
    dev.stop()
    dev = make_device(serial, urn, root=dev.root)
    res = run_cli(["provision", "--port", dev.port, "--offline", "--yes"], home)
    assert res.exit_code == 1  # offline, the laptop can only say what happened
    assert "enrolled itself with the ticket" in res.output and "sync" in res.output
    res = run_cli(["provision", "--port", dev.port, "--yes"], home)
    assert res.exit_code == 0, res.output
    assert "locked already" in res.output
    assert Workspace(home).queued() == [] and Workspace(home).session(serial) is None
    assert len(creds(fleet.app.state.engine, urn)) == 1
