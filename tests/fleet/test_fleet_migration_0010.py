"""Migration 0010 on SQLite and PostgreSQL, over 0009's data: every credential gets the id
of the intermediate that issued it, read from its certificate (none for one without an
AuthorityKeyIdentifier); downgrade and upgrade again work."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy import inspect, text

from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine

from support.fleet import make_csr
from support.migrations import migrate_to
from support.mosquitto import TestPKI

DEVICE = "urn:dev:mac:0024befffe800001"


def test_0010_fills_in_the_issuer_of_existing_credentials(
        db_url: str, ca_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    ca = CertificateAuthority(ca_dirs[1])
    with_aki = ca.sign_csr(make_csr(DEVICE)[0], DEVICE)
    without_aki = TestPKI(tmp_path / "pki").issue_client(DEVICE).cert  # no AKI extension
    engine = make_engine(Settings(mode="development", database_url=db_url), create=True)
    try:
        migrate_to(engine, "0009")
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO device (serial, model, hardware_class, site, firmware_version, id,"
                " state, forgeries, malformed, created_at) VALUES ('SN-1', 'm', 'esp32', '',"
                " '', :id, 'active', 0, 0, CURRENT_TIMESTAMP)"), {"id": DEVICE})
            for n, cert in enumerate((with_aki, without_aki)):
                c.execute(text(
                    "INSERT INTO credential (device_id, serial, kid, public_key, not_before,"
                    " not_after, status, cert_pem) VALUES (:d, :s, :k, '04', :nb, :na,"
                    " 'active', :pem)"),
                    {"d": DEVICE, "s": "%x" % cert.serial_number, "k": "%016x" % n,
                     "nb": cert.not_valid_before_utc, "na": cert.not_valid_after_utc,
                     "pem": cert.public_bytes(serialization.Encoding.PEM).decode()})
        migrate_to(engine, "0010")
        with engine.begin() as c:
            got = dict(c.execute(text("SELECT serial, issuer FROM credential")).all())
        assert got == {"%x" % with_aki.serial_number: ca.id,
                       "%x" % without_aki.serial_number: None}
        migrate_to(engine, "0009", down=True)
        assert "issuer" not in {c["name"] for c in inspect(engine).get_columns("credential")}
        migrate_to(engine, "head")
        assert "issuer" in {c["name"] for c in inspect(engine).get_columns("credential")}
    finally:
        engine.dispose()
