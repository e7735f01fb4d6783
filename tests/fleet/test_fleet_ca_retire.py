"""After a CA rollover, on SQLite and PostgreSQL: enrollment issues from the new
intermediate and gives devices the root alone, ``ca status`` counts the devices that
depend on each intermediate, a campaign selects the old one's devices
(``intermediate=<id>``), and ``ca retire`` refuses while one depends on it (naming it,
audited) and otherwise takes it out of the broker's trust and CRLs."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from sqlmodel import Session, col, select

from cityedge_fleet import ca_retire, campaign_store, registry
from cityedge_fleet.ca import (
    INTERMEDIATES_DIR,
    RETIRED_DIR,
    CertificateAuthority,
    issuer_id,
    load_crls,
)
from cityedge_fleet.ca_retire import RetireRefused, retire
from cityedge_fleet.ca_rollover import rollover
from cityedge_fleet.campaign import SelectorError, parse_selector
from cityedge_fleet.models import AuditRecord, Credential, Device, DeviceState
from cityedge_host.errors import UserError

from support.cli import run as run_cli
from support.fleet import Api, csr_for, enroll_device


def _state(session: Session, device_id: str, state: DeviceState) -> None:
    device = session.get(Device, device_id)
    assert device is not None
    if device.state == DeviceState.provisioned and state == DeviceState.quarantined:
        registry.set_state(session, device=device, state=DeviceState.active)
    registry.set_state(session, device=device, state=state)
    session.commit()


def _audits(session: Session, action: str) -> list[tuple[str, str]]:
    rows = session.exec(select(AuditRecord).where(col(AuditRecord.action) == action)
                        .order_by(col(AuditRecord.id))).all()
    return [(r.outcome, r.target) for r in rows]


def test_enroll_status_select_and_retire_across_a_rollover(
        api: Api, ca_dirs: tuple[Path, Path]) -> None:
    s = api.settings
    old_id = CertificateAuthority(s.ca_dir).id
    moving = enroll_device(api, 1)  # depends on the old intermediate until it rotates
    quarantined = enroll_device(api, 3)  # suspended, may come back: depends on it
    gone = enroll_device(api, 4)  # retired: depends on nothing
    root_pem = CertificateAuthority(s.ca_dir).root_pem()
    assert moving.enrollment["ca_bundle_pem"] == root_pem  # devices trust the root alone

    done = rollover(ca_dirs[0], s.ca_dir)  # the running app notices by itself
    assert done.old_id == old_id
    fresh = enroll_device(api, 2)
    cert = x509.load_pem_x509_certificate(str(fresh.enrollment["certificate_pem"]).encode())
    assert issuer_id(cert) == done.new_id
    chain = x509.load_pem_x509_certificates(str(fresh.enrollment["chain_pem"]).encode())
    assert chain[1].subject == CertificateAuthority(s.ca_dir).cert.subject
    assert fresh.enrollment["ca_bundle_pem"] == root_pem

    with Session(api.engine) as session:
        issuers = {c.device_id: c.issuer for c in session.exec(select(Credential))}
        assert issuers == {moving.id: old_id, quarantined.id: old_id, gone.id: old_id,
                           fresh.id: done.new_id}
        for dev in (moving.id, fresh.id):
            _state(session, dev, DeviceState.active)
        _state(session, quarantined.id, DeviceState.quarantined)
        _state(session, gone.id, DeviceState.retired)
        ca = CertificateAuthority(s.ca_dir)
        assert [(r.id, r.role, r.devices) for r in ca_retire.status(session, ca)] == [
            (done.new_id, "signing", 1), (old_id, "overlap", 2)]
        # the campaign that moves the devices selects the old intermediate's active ones
        now = dt.datetime.now(dt.UTC)
        picked = campaign_store.preview(session, parse_selector("intermediate=" + old_id),
                                        now)
        assert picked.selected == [moving.id]
        # (a quarantined device's certificates are suspended: no campaign rotates it, yet
        # it depends on the old intermediate until it is revoked or comes back and rotates)
        assert picked.left_out == {}
        assert campaign_store.preview(session, parse_selector(
            "intermediate!=" + old_id), now).selected == [fresh.id]

        # retire refuses while a device depends on the old intermediate, and names it
        with pytest.raises(RetireRefused) as e:
            retire(session, s.ca_dir, s, by="test")
        assert sorted(d.device_id for d in e.value.devices) == [moving.id, quarantined.id]
        assert moving.id in (e.value.hint or "") and "intermediate=%s" % old_id in (
            e.value.hint or "")
        assert _audits(session, "ca.retire") == [("refused", old_id)]
        assert [i.id for i in CertificateAuthority(s.ca_dir).overlap] == [old_id]

        # the moving device rotates onto the new intermediate (the proven rotation's end
        # state: the new certificate active, the old one revoked); the quarantined one is
        # revoked by the security team
        new_cert = CertificateAuthority(s.ca_dir).sign_csr(
            csr_for(moving.signer.__class__.generate(), moving.id), moving.id)
        for cred in session.exec(select(Credential).where(
                col(Credential.device_id).in_([moving.id, quarantined.id]))).all():
            registry.revoke_credential(session, credential=cred)
        session.add(Credential(device_id=moving.id, serial="%x" % new_cert.serial_number,
                               kid="ab" * 8, public_key="04", issuer=done.new_id,
                               not_before=new_cert.not_valid_before_utc,
                               not_after=new_cert.not_valid_after_utc, cert_pem="-"))
        session.commit()
        old_serials = {int(c.serial, 16) for c in session.exec(select(Credential).where(
            col(Credential.issuer) == old_id, col(Credential.status) == "revoked"))}

        # the broker's pid file names a process that is gone: the retirement says the
        # broker was not told rather than assuming it from the setting
        stale = s.ca_dir.parent / "gone.pid"
        stale.write_text("%d\n" % (2**22 + 1))  # above Linux's pid_max: no such process
        saved, s.broker_pid_file = s.broker_pid_file, stale
        try:
            result = retire(session, s.ca_dir, s, by="test")
        finally:
            s.broker_pid_file = saved
        assert result.retired == [old_id] and result.signing == done.new_id
        assert result.broker_reloaded is False
        assert _audits(session, "ca.retire") == [("refused", old_id), ("ok", old_id)]
        ca = CertificateAuthority(s.ca_dir)
        assert ca.overlap == [] and (s.ca_dir / RETIRED_DIR / (old_id + ".crt")).is_file()
        assert sorted(p.name for p in (s.ca_dir / INTERMEDIATES_DIR).iterdir()) == [
            done.new_id + ".crt", done.new_id + ".key"]  # the old key is destroyed
        crls = load_crls(ca.crl_path.read_bytes())
        assert [c.issuer for c in crls] == [ca.cert.subject]
        assert old_serials <= {e.serial_number for e in crls[0]}
        bundle = x509.load_pem_x509_certificates(ca.broker_bundle_path.read_bytes())
        assert [c.subject for c in bundle] == [ca.cert.subject, ca.root.subject]
        assert [(r.id, r.devices) for r in ca_retire.status(session, ca)] == [
            (done.new_id, 2)]
        with pytest.raises(UserError, match="nothing to retire"):
            retire(session, s.ca_dir, s, by="test")
    third = enroll_device(api, 5)  # and the service goes on signing
    assert issuer_id(x509.load_pem_x509_certificate(
        str(third.enrollment["certificate_pem"]).encode())) == done.new_id


def test_the_intermediate_selector_takes_ids_only() -> None:
    sel = parse_selector("intermediate=0123456789abcdef|fedcba9876543210,site=harbour")
    assert sel.text() == "intermediate=0123456789abcdef|fedcba9876543210,site=harbour"
    for bad in ("intermediate=old", "intermediate=0123456789ABCDEF",
                "intermediate=0123", "intermediate>0123456789abcdef"):
        with pytest.raises(SelectorError, match="intermediate"):
            parse_selector(bad)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ca_status_and_retire_from_the_command_line(api: Api, ca_dirs: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    s = api.settings
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CITYEDGE_")},
           "CITYEDGE_MODE": "development", "CITYEDGE_DATABASE_URL": s.database_url,
           "CITYEDGE_CA_DIR": str(s.ca_dir), "CITYEDGE_AUDIT_KEY_FILE": str(s.audit_key_file),
           "CITYEDGE_COMMAND_KEY_FILE": str(s.command_key_file)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(args, env, cwd=tmp_path)  # in process (support.cli)

    dev = enroll_device(api, 1)
    r = cli("ca", "rollover", "--root-dir", str(ca_dirs[0]), "--ca-dir", str(s.ca_dir))
    assert r.returncode == 0, r.stderr
    assert "the broker was NOT reloaded" in r.stderr  # no pid file: said loudly
    with Session(api.engine) as session:
        assert [o for o, _ in _audits(session, "ca.rollover")] == ["ok"]
    r = cli("ca", "status", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["role"], x["devices"]) for x in rows] == [("signing", 0), ("overlap", 1)]
    r = cli("ca", "retire")
    assert r.returncode == 1 and r.stderr.startswith("cityedge: intermediate ")
    assert dev.id in r.stderr and "keys rotate --select 'intermediate=%s'" % rows[1]["id"] \
        in r.stderr and "Traceback" not in r.stderr
