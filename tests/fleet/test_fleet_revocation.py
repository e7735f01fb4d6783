"""CRL publishing: re-signed when less than half its life remains, and the broker is
told with SIGHUP (here a stand-in process that records the signal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography import x509
from sqlmodel import Session

from cityedge_fleet import revocation
from cityedge_fleet.ca import CertificateAuthority
from cityedge_fleet.config import Settings

from support.fleet import wait_for

HUP_RECORDER = """
import signal, sys, time
path = sys.argv[1]
def hup(*_):
    with open(path, "a") as f:
        f.write("HUP\\n")
signal.signal(signal.SIGHUP, hup)
open(path, "w").close()
while True:
    time.sleep(0.05)
"""


def test_due_crl_is_resigned_and_the_broker_reloaded(api_settings_engine: tuple[
        Settings, object], tmp_path: Path) -> None:
    settings, engine = api_settings_engine
    hups = tmp_path / "hups"
    proc = subprocess.Popen([sys.executable, "-c", HUP_RECORDER, str(hups)])
    try:
        assert wait_for(hups.exists)
        pid_file = tmp_path / "broker.pid"
        pid_file.write_text("%d\n" % proc.pid)
        settings = settings.model_copy(update={"broker_pid_file": pid_file})
        ca = CertificateAuthority(settings.ca_dir)
        with Session(engine) as session:  # type: ignore[arg-type]
            ca.write_crl([], 7 * 86400)
            assert revocation.refresh_if_due(session, ca, settings) is False
            assert hups.read_text() == ""
            ca.write_crl([], 100)  # 100 s left of 400 (backdated 300 s): due
            assert revocation.refresh_if_due(session, ca, settings) is True
        assert wait_for(lambda: hups.read_text() == "HUP\n")
        crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
        assert crl.next_update_utc is not None and crl.last_update_utc is not None
        life = crl.next_update_utc - crl.last_update_utc
        assert life.total_seconds() >= settings.limits.crl_validity_s
    finally:
        proc.kill()
        proc.wait(5)


def test_reload_without_a_pid_file_is_a_no_op(tmp_path: Path) -> None:
    assert revocation.reload_broker(None) is False
    assert revocation.reload_broker(tmp_path / "missing.pid") is False
