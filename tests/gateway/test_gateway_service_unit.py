"""The gateway as systemd runs it: `cityedge gateway run --check` (a configuration checked
without starting or changing anything) and the ``Type=notify`` protocol (READY, the
watchdog's pings, STOPPING) spoken to a real ``AF_UNIX`` datagram socket by the real
command, as ``systemd`` would hear it."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_gateway.config import load_config
from cityedge_gateway.preflight import check

from support.mosquitto import Mosquitto, TestPKI

pytestmark = pytest.mark.timeout(90)
DEV = "urn:dev:mac:b827ebfffe0000aa"


def _config(d: Path, pki: TestPKI, port: int, *, extra: str = "") -> Path:
    creds = pki.issue_client(DEV)
    key = d / "gateway.key"
    key.write_bytes(creds.key_pem.read_bytes())
    key.chmod(0o600)
    (d / "state").mkdir()
    cfg = d / "gateway.toml"
    cfg.write_text("""
[gateway]
device = "%s"
key_file = "%s"
%s
[store]
path = "%s"

[broker]
host = "127.0.0.1"
port = %d
ca_file = "%s"
cert_file = "%s"
key_file = "%s"
keepalive_s = 5

[[serial]]
name = "pm"
port = "/dev/serial/by-id/usb-not-plugged-in"
protocol = "sds011"
""" % (DEV, key, extra, d / "state" / "buffer.sqlite", port, pki.ca_pem, creds.cert_pem,
       key))
    return cfg


def _levels(cfg: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ok": [], "warn": [], "fail": []}
    for f in check(load_config(cfg)):
        out[f.level].append(f.what)
    return out


def test_check_finds_what_would_stop_the_gateway_and_changes_nothing(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "pki")
    cfg = _config(tmp_path, pki, 8883)
    got = _levels(cfg)
    assert got["fail"] == [], got
    assert any("not present" in w for w in got["warn"])  # the sensor is not plugged in
    assert not (tmp_path / "state" / "buffer.sqlite").exists()  # no store was made
    run = subprocess.run([sys.executable, "-m", "cityedge.cli", "gateway", "run", "--config",
                          str(cfg), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "ready" in run.stdout and "warn" in run.stdout

    key = tmp_path / "gateway.key"
    key.chmod(0o644)  # a key others may read
    other = pki.issue_client("urn:dev:mac:b827ebfffe0000bb")  # another device's certificate
    text = cfg.read_text().replace(str(pki.dir / (DEV.replace(":", "_") + ".crt")),
                                   str(other.cert_pem))
    cfg.write_text(text)
    got = _levels(cfg)
    assert any("mode 644" in f for f in got["fail"]), got
    key.chmod(0o600)
    got = _levels(cfg)
    assert [f for f in got["fail"]] == [
        "[broker] cert_file %s: not the certificate of its key file" % other.cert_pem]
    run = subprocess.run([sys.executable, "-m", "cityedge.cli", "gateway", "run", "--config",
                          str(cfg), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "1 problem" in run.stderr and "fail" in run.stdout
    # an expired certificate
    assert any("expired" in f.what for f in check(
        load_config(cfg), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400)))


def test_check_reads_a_key_in_the_slots_not_the_seed(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "pki")
    slots = tmp_path / "identity"
    cfg = _config(tmp_path, pki, 8883, extra='identity_dir = "%s"' % slots)
    first = _levels(cfg)
    assert first["fail"] == [] and any("seeded from [broker]" in o for o in first["ok"])
    slots.mkdir(mode=0o700)
    (slots / "current").write_text("7")
    assert any("must be 0 or 1" in f for f in _levels(cfg)["fail"])
    # a non-P-256 key in a slot
    (slots / "current").write_text("0")
    bad = ec.generate_private_key(ec.SECP384R1())
    from cryptography.hazmat.primitives import serialization
    (slots / "key0.pem").write_bytes(bad.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (slots / "key0.pem").chmod(0o600)
    assert any("identity slot 0 key" in f for f in _levels(cfg)["fail"])


def _notify_socket(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(30)
    return s


def test_the_gateway_tells_systemd_ready_pings_its_watchdog_and_says_stopping(
        tmp_path: Path, pki: TestPKI) -> None:
    broker = Mosquitto(pki, clients=[DEV]).start()
    try:
        cfg = _config(tmp_path, pki, broker.port)
        sock = _notify_socket(tmp_path)
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
                   WATCHDOG_USEC="400000")  # WATCHDOG_PID unset: meant for this process
        proc = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "gateway", "run",
                                 "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            got = [sock.recv(4096).decode()]
            assert got[0].startswith("READY=1\nSTATUS=gateway %s" % DEV), got
            pings = 0
            while pings < 3:  # pings keep coming while it runs
                msg = sock.recv(4096).decode()
                got.append(msg)
                pings += msg == "WATCHDOG=1"
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while "STOPPING=1" not in got and time.monotonic() < deadline:
                got.append(sock.recv(4096).decode())
            assert "STOPPING=1" in got
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
            sock.close()
        assert got.index("STOPPING=1") > got.index("WATCHDOG=1") > 0
    finally:
        broker.stop()


def test_without_systemd_nothing_is_sent_and_a_watchdog_for_another_pid_is_ignored(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cityedge_host import sd_notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sd_notify.notify("READY=1") is False  # no listener: logged, not raised
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    assert sd_notify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sd_notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert sd_notify.watchdog_interval() is None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = "cityedge-test-%d" % os.getpid()
    sock.bind("\0" + name)  # the abstract namespace, as systemd names it with "@"
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("STATUS=x") is True
        assert sock.recv(100) == b"STATUS=x"
    finally:
        sock.close()
