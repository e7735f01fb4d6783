"""`cityedge fleet serve` for real: uvicorn on a free port, the database made by `cityedge
fleet init-db`, what it runs against said at start, OpenAPI at /docs, and the bootstrap
admin token from `cityedge fleet create-token`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cityedge_fleet.config import Settings
from cityedge_fleet.db import describe_database
from cityedge_fleet.serve import describe_start

from support.fleet import wait_for
from support.mosquitto import free_port
from support.procs import stop


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_serve_applies_migrations_and_accepts_the_bootstrap_token(
        db_url: str, ca_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    env = dict(os.environ, CITYEDGE_MODE="development", CITYEDGE_DATABASE_URL=db_url,
               CITYEDGE_CA_DIR=str(ca_dirs[1]),
               CITYEDGE_INGEST_WITH_SERVE="false")
    init = subprocess.run([sys.executable, "-m", "cityedge.cli", "fleet", "init-db"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0 and ": created, schema " in init.stdout, init.stderr
    made = subprocess.run([sys.executable, "-m", "cityedge.cli", "fleet", "create-token",
                           "--name", "ops", "--role", "admin"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert len(token) >= 43 and "printed once" in made.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "fleet", "serve", "--port",
                             str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    base = "http://127.0.0.1:%d" % port
    try:
        def up() -> bool:
            try:
                return httpx.get(base + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(up, timeout=30), proc.stderr.read().decode() if proc.stderr else ""
        assert httpx.get(base + "/docs").status_code == 200
        assert "/enroll" in httpx.get(base + "/openapi.json").json()["paths"]
        auth = {"Authorization": "Bearer " + token}
        r = httpx.get(base + "/audit/verify", headers=auth)
        assert r.status_code == 200 and r.json()["ok"] is True and r.json()["rows"] == 1
        assert httpx.get(base + "/devices", headers={"Authorization": "Bearer x"}
                         ).status_code == 401
    finally:
        stop(proc, 10)
    said = proc.stderr.read().decode() if proc.stderr else ""
    banner = [ln.removeprefix("cityedge fleet serve: ") for ln in said.splitlines()
              if ln.startswith("cityedge fleet serve: ")]
    assert banner == ["mode development", "database %s" % describe_database(db_url),
                      "CA directory %s" % ca_dirs[1], "broker for devices %s"
                      % "mqtts://127.0.0.1:8883", "ingest off"], said


def test_serve_tells_systemd_ready_once_listening_pings_and_says_stopping(
        ca_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """``Type=notify``: READY only once the port answers, WATCHDOG=1 from the event loop
    while it runs, STOPPING=1 on SIGTERM (a real AF_UNIX socket in systemd's place)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(60)
    port = free_port()
    env = dict(os.environ, CITYEDGE_MODE="development",
               CITYEDGE_DATABASE_URL="sqlite:///%s" % (tmp_path / "fleet.sqlite3"),
               CITYEDGE_CA_DIR=str(ca_dirs[1]), CITYEDGE_INGEST_WITH_SERVE="false",
               CITYEDGE_COMMAND_KEY_FILE=str(tmp_path / "command.key"),
               CITYEDGE_AUDIT_KEY_FILE=str(tmp_path / "audit.key"),
               NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "fleet", "serve", "--port",
                             str(port), "--no-ingest", "--init-db"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=fleet API on 127.0.0.1:%d" % port), first
        # READY came after the socket was bound: the port answers now, without waiting
        assert httpx.get("http://127.0.0.1:%d/health" % port, timeout=10).status_code == 200
        got = [sock.recv(4096).decode() for _ in range(2)]
        assert got == ["WATCHDOG=1", "WATCHDOG=1"]
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got.append(sock.recv(4096).decode())
        # uvicorn shuts down gracefully, then re-raises the signal it caught: systemd counts
        # an exit by SIGTERM as clean (its default SuccessExitStatus)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        stop(proc, 10)
        sock.close()


def test_the_start_banner_names_the_clusters_queue_when_the_ingest_reads_it(
        tmp_path: Path) -> None:
    """On a RabbitMQ cluster the ingest consumes the quorum queue over AMQP from
    ``ingest_amqp_nodes``: its banner says so, not the MQTT port it never opens."""
    s = Settings(mode="development", database_url="sqlite:///%s" % (tmp_path / "f.sqlite3"),
                 ca_dir=tmp_path, broker_engine="rabbitmq",
                 ingest_amqp_nodes="10.0.0.1:5671,10.0.0.2:5671")
    assert describe_start(s, ingest=True)[-1] == (
        "ingest from the RabbitMQ queue cityedge.ingest (AMQP over TLS: 10.0.0.1:5671, "
        "10.0.0.2:5671; the first that answers)")
    mosquitto = s.model_copy(update={"broker_engine": "mosquitto", "mqtt_port": 8884})
    assert describe_start(mosquitto, ingest=True)[-1] == (
        "ingest from mqtts://127.0.0.1:8884 (plain subscriptions)")
