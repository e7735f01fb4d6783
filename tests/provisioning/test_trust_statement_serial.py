"""The fleet's trust statement over the serial provisioning path: the real firmware on the
MicroPython unix port with its UART on a pty, the real fleet (SQLite, uvicorn) and the real
TLS Mosquitto, driven by ``cityedge provision`` or by the host's ``SerialTransport``.

After a command-key rotation the fleet's enrollment answer carries the offline root's
newest statement of its command keys (``EnrollResponse.trust_statement``). The tool passes
it on in the ``install`` request (``frame.F_STATEMENT``); the device checks it against the
root it is given (the last certificate of the CA bundle: the test PKI's CA, which is the
fleet's root here) exactly as at its own enrollment (``trust_check.install_checked``) and
answers ``installed`` or ``refused``. The attacks: a forged statement (another key under
the root's kid), one by a key that is not the root, garbage, and an older root statement
after a newer one (a rollback), each refused with the reason and nothing installed.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cli_support import run_cli
from device_pty import DeviceFactory
from fleet_server import FleetServer, installed_fleet_keys
from sqlmodel import Session

from cityedge_core import cose, frame, trust_statement
from cityedge_fleet.models import CommandKeyRotation, CommandKeyRotationState
from cityedge_fw import keys, trust_check
from cityedge_host.crypto import EcSigner, public_sec1
from cityedge_provision.fleet_client import Workspace
from cityedge_provision.limits import ProvisionLimits
from cityedge_provision.transport import SerialTransport

from support.device_cert import install_fields, issue_for_csr
from support.mosquitto import Mosquitto, TestPKI

LIMITS = ProvisionLimits(reply_timeout_s=20.0, open_timeout_s=10.0)


def statement(signer: EcSigner, version: int, points: list[bytes],
              kid: bytes | None = None) -> bytes:
    now = int(time.time())
    return trust_statement.encode_statement(signer, kid or signer.kid, version,
                                            [(p, None) for p in points], now - 300, now + 3600)


def roll_out(fleet: FleetServer, data: bytes, version: int) -> None:
    """The fleet's record of a command-key rotation with statement ``data``: what its
    enrollment answer hands out from now on (``enrollment.hand_out_statement``)."""
    now = dt.datetime.now(dt.UTC)
    with Session(fleet.app.state.engine) as s:
        s.add(CommandKeyRotation(
            version=version, statement=data, statement_sha256="0" * 64, old_kid="00" * 8,
            new_kid="11" * 8, expires_at=now + dt.timedelta(hours=1), threshold_pct=100,
            state=CommandKeyRotationState.rolling_out, created_by="test"))
        s.commit()


def device_trust(root: Path) -> tuple[Any, list[bytes]]:
    """The installed statement on the device's flash (``trust_check.installed``) and the
    kids its agent would obey at boot (``keys.load_fleet_keys``)."""
    cfg = json.loads((root / "config.json").read_text())
    trust = root / (Path(cfg["store"]["state"]).name + ".trust")
    paths = [str(root / Path(p).name) for p in cfg["fleet_keys"]]
    return trust_check.installed(str(trust)), list(keys.load_fleet_keys(paths, str(trust)))


def provision(fleet: FleetServer, dev_port: str, home: Path) -> Any:
    Workspace(home).save_login(fleet.url, fleet.token())
    return run_cli(["provision", "--port", dev_port, "--yes", "--json"], home)


def test_the_roots_statement_reaches_the_device_over_serial(
        make_device: DeviceFactory, fleet: FleetServer, pki: TestPKI, tmp_path: Path) -> None:
    """``cityedge provision`` after a command-key rotation: the device installs the
    root's statement, so its agent obeys the statement's keys from the first boot (not the
    seed alone), holds its version (an older one is a rollback from now on), and the
    self-test and the lock still pass in the provisioning heap."""
    nxt = EcSigner.generate()
    current = fleet.trust_store()[0]
    roll_out(fleet, statement(EcSigner(pki.ca_key), 3, [public_sec1(nxt.public_key),
                                                         current]), 3)
    dev = make_device("SN-T0001", "urn:dev:mac:0024befffe80a001")
    res = provision(fleet, dev.port, tmp_path / "laptop")
    assert res.exit_code == 0, res.output
    assert "the fleet's trust statement v3 installed" in res.output, res.output
    outcome = json.loads(res.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "provisioned" and outcome["warnings"] == [], outcome
    held, obeyed = device_trust(dev.root)
    assert held is not None and held[0] == 3
    assert sorted(obeyed) == sorted([nxt.kid, cose.kid_for_public_key(current)])
    cfg = json.loads((dev.root / "config.json").read_text())
    assert installed_fleet_keys(dev.root, cfg) == fleet.trust_store()  # the seed, kept


@pytest.mark.parametrize("case", ["forged", "not_the_roots", "garbage"])
def test_a_statement_the_root_did_not_sign_is_refused_over_serial(
        make_device: DeviceFactory, fleet: FleetServer, pki: TestPKI, tmp_path: Path,
        case: str) -> None:
    """The attack: the fleet's answer (a fleet server whose command key was stolen, not
    the root) carries a statement of its own making, listing a key of its own: forged
    under the root's kid, signed under its own kid, or garbage. The device refuses it,
    installs nothing (it obeys the seed key only), and the tool finishes the install but
    says so plainly, with the device's reason."""
    thief = EcSigner.generate()
    point = public_sec1(thief.public_key)
    data = {"forged": statement(thief, 9, [point], kid=EcSigner(pki.ca_key).kid),
            "not_the_roots": statement(thief, 9, [point]),
            "garbage": b"\xa1\x01\xff\x00garbage"}[case]
    roll_out(fleet, data, 9)
    dev = make_device("SN-T0002", "urn:dev:mac:0024befffe80a002")
    res = provision(fleet, dev.port, tmp_path / "laptop")
    assert res.exit_code == 0, res.output
    outcome = json.loads(res.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "provisioned", outcome
    assert len(outcome["warnings"]) == 1, outcome
    warning = outcome["warnings"][0]
    assert warning.startswith("the device refused the fleet's trust statement: ")
    reason = {"forged": "signature does not verify", "not_the_roots": "not by the root",
              "garbage": "not a COSE_Sign1"}[case]
    assert reason in warning, warning
    assert "Warning: the device refused the fleet's trust statement" in res.output
    assert "trust statement NOT installed" in res.output
    held, obeyed = device_trust(dev.root)
    assert held is None  # nothing installed
    seed = fleet.trust_store()
    assert len(obeyed) == 1 and thief.kid not in obeyed
    cfg = json.loads((dev.root / "config.json").read_text())
    assert installed_fleet_keys(dev.root, cfg) == seed


def test_the_install_frame_answers_installed_refused_and_rollback(
        make_device: DeviceFactory, pki: TestPKI, mosquitto: Mosquitto) -> None:
    """The frames themselves (a laptop of an attacker's on an unlocked device, or a
    resumed install): the root's v2 is installed; the same again is installed already
    (v2 held); a root-signed v1 after it is a rollback, refused; a forged v5 is refused;
    an install without a statement says nothing of one. The device's trust stays v2."""
    root = EcSigner(pki.ca_key)
    a = EcSigner.generate()
    dev = make_device("SN-T0003", "urn:dev:mac:0024befffe80a003")
    with SerialTransport(dev.port, LIMITS) as t:
        t.request(frame.T_GENERATE_KEY)
        cert = issue_for_csr(pki.ca_key, pki.ca_cert, t.request(frame.T_CSR)[frame.F_CSR])
        fields = install_fields(pki, cert, mosquitto.port, [public_sec1(a.public_key)])
        v2 = statement(root, 2, [public_sec1(a.public_key)])

        def install(data: bytes) -> dict[int, Any]:
            return t.request(frame.T_INSTALL, {**fields, **{
                frame.F_STATEMENT: data, frame.F_NOW: int(time.time())}})

        first = install(v2)
        assert (first[frame.F_TRUST], first[frame.F_TRUST_VERSION]) == ("installed", 2), first
        again = install(v2)
        assert (again[frame.F_TRUST], again[frame.F_TRUST_VERSION]) == ("installed", 2), again
        rollback = install(statement(root, 1, [public_sec1(EcSigner.generate().public_key)]))
        assert rollback[frame.F_TRUST] == "refused", rollback
        assert "rollback" in rollback[frame.F_MESSAGE], rollback
        forged = install(statement(EcSigner.generate(), 5, [public_sec1(a.public_key)],
                                   kid=root.kid))
        assert forged[frame.F_TRUST] == "refused" and frame.F_TRUST_VERSION not in forged
        plain = t.request(frame.T_INSTALL, fields)  # no statement: nothing said about one
        assert frame.F_TRUST not in plain and plain[frame.F_KID] == first[frame.F_KID]
    held, obeyed = device_trust(dev.root)
    assert held is not None and held[0] == 2
    assert obeyed == [a.kid]


def test_a_device_without_a_clock_checks_the_window_at_the_hosts_time(
        tmp_path: Path, pki: TestPKI) -> None:
    """A board before NTP has no trusted clock (``provision._unix_clock``: None): it
    checks the statement's window at the host's time (``F_NOW``); with neither it refuses
    (no trusted clock). The state machine itself, on CPython (as the firmware tests run
    it): the unix port always has a clock."""
    from cityedge_fw import provision

    info = {"model": "ce-sim-1", "serial": "SN-T0004", "device": "urn:dev:mac:0024befffe80a004",
            "firmware": "0.1.0"}
    root = EcSigner(pki.ca_key)
    a = EcSigner.generate()
    for host_time, want in ((None, "refused"), (int(time.time()), "installed")):
        d = tmp_path / str(host_time)
        d.mkdir()
        prov = provision.Provisioner(str(d), info, clock=lambda: None)
        prov.handle({frame.F_TYPE: frame.T_GENERATE_KEY})
        csr_der = prov.handle({frame.F_TYPE: frame.T_CSR})[frame.F_CSR]
        fields = install_fields(pki, issue_for_csr(pki.ca_key, pki.ca_cert, csr_der), 8883,
                                [public_sec1(a.public_key)])
        fields[frame.F_STATEMENT] = statement(root, 4, [public_sec1(a.public_key)])
        if host_time is not None:
            fields[frame.F_NOW] = host_time
        reply = prov.handle({**fields, frame.F_TYPE: frame.T_INSTALL})
        assert reply[frame.F_TRUST] == want, reply
        if want == "refused":
            assert "no trusted clock" in reply[frame.F_MESSAGE]
            assert device_trust(d)[0] is None
        else:
            assert device_trust(d)[0][0] == 4
