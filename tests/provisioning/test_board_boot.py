"""The board boot path (``cityedge_fw.main.main(uart, info)``) on CPython with a fake UART
and a fake reset: provisioning mode while not locked, a reset after a fresh lock, then the
agent on the next boot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from device_pty import HEAP, MICROPYTHON
from fleet_server import FleetServer
from prov_helpers import INFO, FakeUart, pki
from sqlmodel import Session, select

from cityedge_core import frame
from cityedge_fleet import enrollment
from cityedge_fleet.models import Credential
from cityedge_fw import main, provision

from support.device_cert import install_fields, issue_for_csr


def test_board_boot_provisions_resets_then_starts_the_agent(tmp_path: Path) -> None:
    root = str(tmp_path)
    prov = provision.Provisioner(root, INFO)
    prov.handle({0: frame.T_GENERATE_KEY})
    csr_der = prov.handle({0: frame.T_CSR})[frame.F_CSR]
    p = pki()
    cert = issue_for_csr(p.ca_key, p.ca_cert, csr_der)
    assert prov.handle({0: frame.T_INSTALL, **install_fields(p, cert, 8883)})[0] == \
        frame.T_INSTALL
    prov._set_state(provision.TESTED)  # as after a passed self-test
    resets: list[int] = []
    agents: list[dict[str, Any]] = []
    uart = FakeUart(frame.encode_frame({0: frame.T_LOCK, frame.F_ID: 1}))
    assert main.main(uart, INFO, root, reset=lambda: resets.append(1),
                     agent=lambda cfg, board: agents.append(cfg)) is True
    assert resets == [1] and agents == []  # fresh lock: reset, the agent starts next boot
    assert provision.is_locked(root)
    main.main(FakeUart(b""), INFO, root, reset=lambda: resets.append(1),
              agent=lambda cfg, board: agents.append(cfg))
    assert resets == [1] and len(agents) == 1  # locked: no UART use, the agent starts
    assert agents[0]["device"] == INFO["device"]


BOARD = """
import sys, json
sys.path.insert(0, %(mpy)r)
from cityedge_fw import main

class QuietUart:  # a board's UART with no technician attached
    def read(self, n):
        return None
    def write(self, b):
        return len(b)

resets = []
agents = []
info = %(info)r
r1 = main.main(QuietUart(), info, %(root)r, reset=lambda: resets.append(1),
               agent=lambda cfg, board: agents.append(cfg["device"]))
r2 = main.main(QuietUart(), info, %(root)r, reset=lambda: resets.append(1),
               agent=lambda cfg, board: agents.append(cfg["device"]))
print("RESULT " + json.dumps([r1, r2, resets, agents]))
"""


def test_board_boot_on_micropython_enrolls_a_pending_ticket_then_resets(
        fw_mpy: Path, fleet: FleetServer, tmp_path: Path) -> None:
    """The real board path on the unix port: a device holding an offline ticket boots with
    nobody on its UART, enrolls itself at the (real) fleet, resets, then starts the agent."""
    root = tmp_path / "flash"
    root.mkdir()
    prov = provision.Provisioner(str(root), INFO)
    prov.handle({0: frame.T_GENERATE_KEY})
    with Session(fleet.app.state.engine) as s:
        _, token = enrollment.issue_token(s, serial=INFO["serial"], ttl_s=600,
                                          created_by="tech")
        s.commit()
    reply = prov.handle({0: frame.T_INSTALL, provision.F_TICKET: {
        "token": token, "url": fleet.url + "/enroll/ticket", "dev_http": True,
        "register": {"id": INFO["device"], "model": INFO["model"]}}})
    assert reply[frame.F_STATE] == provision.PENDING, reply
    proc = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=" + HEAP, "-c",
         BOARD % {"mpy": str(fw_mpy), "info": INFO, "root": str(root)}],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out, proc.stdout + proc.stderr
    assert json.loads(out[0][7:]) == [True, None, [1], [INFO["device"]]], proc.stderr
    assert "enrolled after 0 failed attempt(s)" in proc.stderr
    with Session(fleet.app.state.engine) as s:
        creds = s.exec(select(Credential).where(Credential.device_id == INFO["device"])).all()
        assert len(creds) == 1


def test_a_fragmented_heap_resets_the_board_and_keeps_the_ticket(tmp_path: Path) -> None:
    from cityedge_fw.provision_main import EnrollRetry

    prov = provision.Provisioner(str(tmp_path), INFO)
    prov.handle({0: frame.T_GENERATE_KEY})
    prov.handle({0: frame.T_INSTALL, provision.F_TICKET: {
        "token": "t", "url": "http://127.0.0.1:9/enroll/ticket", "dev_http": True}})

    def post(*args: Any) -> tuple[int, bytes]:
        raise MemoryError("memory allocation failed, allocating 1252 bytes")

    resets: list[int] = []
    EnrollRetry(prov, post, reset=lambda: resets.append(1)).run()
    assert resets == [1]
    assert provision.Provisioner(str(tmp_path), INFO).ticket() is not None  # after reboot
