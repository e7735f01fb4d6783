"""Offline provisioning with pre-fetched tokens and ``sync``, ``replace``, ``bulk`` from a
vendor manifest (each device proving itself with the claim secret in its flash), and
labels: against the real fleet, broker and firmware on ptys."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import httpx
import qrcode
from cli_support import check_expected, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from device_pty import DeviceFactory
from fleet_server import FleetServer
from PIL import Image
from sqlmodel import Session, select

from cityedge_core import frame
from cityedge_fleet.models import Credential, Device, Role
from cityedge_provision import label
from cityedge_provision.fleet_client import Workspace
from cityedge_provision.transport import SerialTransport


def device_row(fleet: FleetServer, urn: str) -> Device | None:
    with Session(fleet.app.state.engine) as s:
        return s.get(Device, urn)


def creds(fleet: FleetServer, urn: str) -> list[Credential]:
    with Session(fleet.app.state.engine) as s:
        return list(s.exec(select(Credential).where(Credential.device_id == urn)).all())


def state_of(port: str) -> str:
    with SerialTransport(port) as t:
        return str(t.request(frame.T_HELLO)[frame.F_STATE])


def test_offline_provisioning_then_sync_then_finish(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    urn = "urn:dev:mac:0024befffe800401"
    res = run_cli(["provision", "tokens", "SN-00401"], home)
    assert res.exit_code == 0, res.output
    check_expected("tokens", res.output)
    assert (home / "tokens.json").stat().st_mode & 0o777 == 0o600
    dev = make_device("SN-00401", urn)
    # in the cellar: no connection
    res = run_cli(["provision", "--port", dev.port, "--offline", "--yes", "--site", "depot"],
                  home)
    assert res.exit_code == 0, res.output
    check_expected("offline_queued", res.output)
    assert device_row(fleet, urn) is None  # nothing reached the fleet
    assert state_of(dev.port) == "keyed"
    assert len(Workspace(home).queued()) == 1
    # back online
    res = run_cli(["provision", "sync"], home)
    assert res.exit_code == 0, res.output
    check_expected("sync", res.output)
    assert Workspace(home).queued() == []
    row = device_row(fleet, urn)
    assert row is not None and row.site == "depot" and row.state == "provisioned"
    # the next visit finishes the device, even offline
    res = run_cli(["provision", "--port", dev.port, "--offline", "--yes"], home)
    assert res.exit_code == 0, res.output
    check_expected("offline_finish", res.output)
    assert state_of(dev.port) == "locked"
    with SerialTransport(dev.port) as t:
        kid = t.request(frame.T_HELLO)[frame.F_KID].hex()
    assert [c.kid for c in creds(fleet, urn)] == [kid]


def test_offline_without_a_valid_token_says_what_to_do(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    ws = Workspace(home)
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    ws.save_tokens({"SN-00402": {"token": "expired-token", "expires_at": past}})
    dev = make_device("SN-00402", "urn:dev:mac:0024befffe800402")
    res = run_cli(["provision", "--port", dev.port, "--offline", "--yes"], home)
    assert res.exit_code == 1
    check_expected("offline_token_expired", res.output)
    assert ws.queued() == []


def test_replace_moves_the_site_and_retires_the_old_device(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token(Role.admin, "lead-tech"))
    old_urn, new_urn = "urn:dev:mac:0024befffe800501", "urn:dev:mac:0024befffe800502"
    old = make_device("SN-00501", old_urn)
    res = run_cli(["provision", "--port", old.port, "--yes", "--site", "harbour", "--tag",
                   "air"], home)
    assert res.exit_code == 0, res.output
    new = make_device("SN-00502", new_urn)
    res = run_cli(["provision", "replace", old_urn, "--port", new.port, "--yes"], home)
    assert res.exit_code == 0, res.output
    check_expected("replace", res.output)
    old_row, new_row = device_row(fleet, old_urn), device_row(fleet, new_urn)
    assert old_row is not None and old_row.state == "retired"
    assert new_row is not None and new_row.site == "harbour"
    assert [c.status for c in creds(fleet, old_urn)] == ["revoked"]
    assert [c.status for c in creds(fleet, new_urn)] == ["active"]
    crl = x509.load_pem_x509_crl((fleet.settings.ca_dir / "crl.pem").read_bytes())
    old_serial = int(creds(fleet, old_urn)[0].serial, 16)
    assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None


def test_bulk_from_a_vendor_manifest_with_a_summary(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    claims = {"SN-006%02d" % i: new_claim() for i in range(1, 5)}
    devs = [make_device("SN-006%02d" % i, "urn:dev:mac:0024befffe8006%02x" % i,
                        claim=claims["SN-006%02d" % i]) for i in range(1, 4)]
    wrong = make_device("SN-99999", "urn:dev:mac:0024befffe809999")  # not the manifest's
    manifest = tmp_path / "delivery.json"
    entries = [{"serial": d.serial, "claim_sha256": sha256_hex(claims[d.serial]),
                "port": d.port, "site": "school-%d" % i} for i, d in enumerate(devs, 1)]
    entries.append({"serial": "SN-00604", "claim_sha256": sha256_hex(claims["SN-00604"]),
                    "port": wrong.port, "site": "school-4"})
    manifest.write_text(json.dumps({"manifest": "DN-2026-117", "devices": entries}))
    res = run_cli(["provision", "bulk", str(manifest), "--yes", "--labels-dir",
                   str(tmp_path / "labels")], home)
    assert res.exit_code == 1, res.output  # one device failed
    check_expected("bulk", res.output)
    for d in devs:
        assert state_of(d.port) == "locked"
        assert (tmp_path / "labels" / ("%s.png" % d.serial)).exists()
    assert state_of(wrong.port) == "unprovisioned"


def new_claim() -> str:
    """A claim secret as a vendor makes one: 32 random bytes, URL-safe base64 (43 chars)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_bulk_enrolls_only_the_devices_holding_their_claim(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    """The attack end to end: SN-00612's serial is in the manifest, but the device on the
    port is a counterfeit with another claim in its flash, and SN-00613 has none. The tool
    refuses both before the fleet; an attacker posting the serial (with or without the
    counterfeit's claim) straight to the real fleet is refused with the one answer; the
    genuine SN-00612 then enrolls with its claim, which works once."""
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    claims = {"SN-006%02d" % i: new_claim() for i in (11, 12, 13)}
    good = make_device("SN-00611", "urn:dev:mac:0024befffe800611", claim=claims["SN-00611"])
    fake = make_device("SN-00612", "urn:dev:mac:0024befffe800612", claim=new_claim(),
                       root=tmp_path / "counterfeit")
    bare = make_device("SN-00613", "urn:dev:mac:0024befffe800613")
    manifest = tmp_path / "delivery.json"
    manifest.write_text(json.dumps({"manifest": "DN-2026-118", "devices": [
        {"serial": d.serial, "claim_sha256": sha256_hex(claims[d.serial]), "port": d.port}
        for d in (good, fake, bare)]}))
    res = run_cli(["provision", "bulk", str(manifest), "--yes"], home)
    assert res.exit_code == 1, res.output
    assert "SN-00612: the device's claim secret does not match the manifest's claim for " \
        "serial SN-00612" in res.output
    assert "SN-00613: the device (serial SN-00613) reports no claim secret" in res.output
    assert "1 of 3 devices provisioned." in res.output
    assert [state_of(d.port) for d in (good, fake, bare)] == ["locked", "keyed", "keyed"]
    fake_claim = (tmp_path / "counterfeit" / "claim.txt").read_text()
    assert claims["SN-00612"] not in res.output and fake_claim not in res.output
    csr = fleet_csr("urn:dev:mac:0024befffe800612")
    for proof in ({}, {"claim": fake_claim}, {"claim": claims["SN-00611"]}):
        r = httpx.post(fleet.url + "/enroll", json={"serial": "SN-00612", "csr_pem": csr,
                                                    **proof}, timeout=10)
        assert (r.status_code, r.json()) == (403, {"detail": "enrollment refused"}), proof
    assert creds(fleet, "urn:dev:mac:0024befffe800612") == []
    fake.stop()
    genuine = make_device("SN-00612", "urn:dev:mac:0024befffe800612",
                          claim=claims["SN-00612"], root=tmp_path / "genuine")
    manifest.write_text(json.dumps({"manifest": "DN-2026-118", "devices": [
        {"serial": "SN-00612", "claim_sha256": sha256_hex(claims["SN-00612"]),
         "port": genuine.port}]}))
    res = run_cli(["provision", "bulk", str(manifest), "--yes", "--json"], home)
    assert res.exit_code == 0, res.output
    assert "0 serial(s) allow-listed, 1 already listed" in res.stderr  # progress: stderr
    got = json.loads(res.stdout)  # stdout is the JSON alone, for a script
    assert got["manifest"] == "DN-2026-118" and len(got["devices"]) == 1
    one = got["devices"][0]
    assert (one["status"], one["serial"], one["device"]) == (
        "provisioned", "SN-00612", "urn:dev:mac:0024befffe800612")
    assert one["steps"] and all(set(s) == {"name", "detail", "seconds"} for s in one["steps"])
    assert claims["SN-00612"] not in res.stdout
    assert state_of(genuine.port) == "locked"
    assert len(creds(fleet, "urn:dev:mac:0024befffe800612")) == 1
    again = httpx.post(fleet.url + "/enroll", json={
        "serial": "SN-00612", "claim": claims["SN-00612"], "csr_pem": csr}, timeout=10)
    assert (again.status_code, again.json()) == (403, {"detail": "enrollment refused"})


def fleet_csr(urn: str) -> str:
    """An attacker's CSR for ``urn``: their own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    req = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, urn)])).sign(key, hashes.SHA256())
    return req.public_bytes(serialization.Encoding.PEM).decode()


def qr_modules(img: Image.Image, size: int) -> list[list[bool]]:
    """Sample the label's QR code at the centre of each module (box 8 px, border 2)."""
    box, border = label.QR_BOX_PX, label.QR_BORDER_MODULES
    width = (size + 2 * border) * box
    left = (img.width - width) // 2
    px = img.convert("L").load()
    assert px is not None
    return [[px[left + (border + c) * box + box // 2, (border + r) * box + box // 2] < 128
             for c in range(size)] for r in range(size)]


def test_label_png_and_pdf_carry_the_urn(tmp_path: Path) -> None:
    urn = "urn:dev:mac:0024befffe800701"
    res = run_cli(["provision", "label", urn, "--serial", "SN-00701", "--site", "harbour",
                   "--out", str(tmp_path / "l.png")], tmp_path)
    assert res.exit_code == 0, res.output
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(urn)
    qr.make(fit=True)
    matrix = [[bool(x) for x in row[4:-4]] for row in qr.get_matrix()[4:-4]]  # no border
    with Image.open(tmp_path / "l.png") as img:
        assert qr_modules(img, len(matrix)) == matrix
    res = run_cli(["provision", "label", urn, "--serial", "SN-00701", "--out",
                   str(tmp_path / "l.pdf")], tmp_path)
    assert res.exit_code == 0
    assert (tmp_path / "l.pdf").read_bytes().startswith(b"%PDF")
    res = run_cli(["provision", "label", urn, "--serial", "x", "--out",
                   str(tmp_path / "l.gif")], tmp_path)
    assert res.exit_code == 1 and "a label is .png or .pdf" in res.output


def test_replace_by_a_technician_leaves_retiring_to_security(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())  # technician: may not revoke
    old_urn, new_urn = "urn:dev:mac:0024befffe800511", "urn:dev:mac:0024befffe800512"
    old = make_device("SN-00511", old_urn)
    assert run_cli(["provision", "--port", old.port, "--yes", "--site", "pier"],
                   home).exit_code == 0
    new = make_device("SN-00512", new_urn)
    res = run_cli(["provision", "replace", old_urn, "--port", new.port, "--yes"], home)
    assert res.exit_code == 1
    check_expected("replace_technician", res.output)
    new_row = device_row(fleet, new_urn)
    assert new_row is not None and new_row.site == "pier" and state_of(new.port) == "locked"
    old_row = device_row(fleet, old_urn)
    assert old_row is not None and old_row.state != "retired"


def test_device_reset_after_enrollment_is_refused_with_guidance(
        make_device: DeviceFactory, fleet: FleetServer, tmp_path: Path) -> None:
    """A device wiped after the fleet certified its old key: the tool does not enroll a
    second identity silently (the old certificate would dangle); it says who can fix it."""
    home = tmp_path / "laptop"
    Workspace(home).save_login(fleet.url, fleet.token())
    urn = "urn:dev:mac:0024befffe800521"
    first = make_device("SN-00521", urn, root=tmp_path / "flash-1")
    assert run_cli(["provision", "--port", first.port, "--yes"], home).exit_code == 0
    first.stop()
    wiped = make_device("SN-00521", urn, root=tmp_path / "flash-2")  # empty flash
    res = run_cli(["provision", "--port", wiped.port, "--yes"], home)
    assert res.exit_code == 1
    check_expected("reset_device", res.output)
    assert state_of(wiped.port) == "unprovisioned"
    assert len(creds(fleet, urn)) == 1
