"""The system part of ``make demo``: a city in a temporary directory, on loopback.

1. The security team's part: an offline root and an online intermediate CA; certificates
   for the broker and the ingest service; Mosquitto configured by ``cityedge broker
   config`` (mTLS, CN as the username, per-device ACL, CRL).
2. The fleet service (SQLite) with its ingest worker.
3. A field technician provisions simulated devices over their serial lines (the real
   firmware on the MicroPython unix port, its UART on a pseudo-terminal) with
   ``cityedge provision``: key made on the device, CSR, enrollment, install, self-test.
4. The devices boot their agent and stream signed readings; the fleet verifies every batch
   and serves the readings with their provenance; the audit log is verified.
5. The security team rotates a streaming Raspberry Pi gateway's key (``demo_rotation``).
6. Signed releases reach that gateway and a second one through OTA campaigns in two
   waves; a broken release is rolled back and halts its campaign (``demo_ota``).
7. ``then`` (the hardware checker's part of the demo) runs while the city still runs;
   at the end the web console and the public SensorThings API answer, with the address,
   a token to sign in with and the open-data URL (``demo_opendata``).

Everything runs as child processes that are stopped at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from cityedge import demo_opendata, demo_ota, demo_rotation
from cityedge_fleet import broker, broker_acl
from cityedge_fleet.ca import CertificateAuthority, init_ca, issue_service
from cityedge_fleet.ca_custody import Custody
from cityedge_host.ports import free_port

BIN = Path(sys.executable).parent
DEVICES = (
    ("SN-DEMO-0001", "urn:dev:mac:02c17e000001", "harbour"),
    ("SN-DEMO-0002", "urn:dev:mac:02c17e000002", "old-town"),
    ("SN-DEMO-0003", "urn:dev:mac:02c17e000003", "ring-road"),
)
STREAM_SECONDS = 25
# the real clock (time_scale 1): readings carry UNIX time, as on a board after NTP, so
# open data may publish them (it never publishes seconds-since-boot readings)
AGENT_SETTINGS = {"sample_interval_s": 1, "batch_readings": 6, "time_scale": 1,
                  "status_interval_s": 10}
START_TIMEOUT_S = 30
SHARE_GROUP = "demo-ingest-share"  # the ingest's shared-subscription group
READINGS_PAGE = 500  # the readings API's page maximum


class DemoError(Exception):
    """A step of the demo failed; the message says which and where its log is."""


def wait_until(check: Any, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, httpx.HTTPError):
            if check():
                return
        time.sleep(0.2)
    raise DemoError("%s did not come up within %d s" % (what, timeout))


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


class Processes:
    """Child processes, each with its log file; all are stopped on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / (name + ".log"), "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.running.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(self.running):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cityedge(args: list[str], env: dict[str, str], stdin: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BIN / "cityedge"), *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise DemoError("`cityedge %s` failed:\n%s%s" % (" ".join(args), done.stdout,
                                                        done.stderr))
    return done


def _mosquitto_can_read(path: Path) -> None:
    """Mosquitto drops root to its own user: hand it its key and its directory."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("mosquitto")
        os.chown(path, user.pw_uid, user.pw_gid)


@contextlib.contextmanager
def city(con: Console) -> Iterator[dict[str, Any]]:
    """CA, broker and fleet running in a temporary directory; yields what the rest needs."""
    work = Path(tempfile.mkdtemp(prefix="cityedge-demo-"))
    work.chmod(0o755)
    logs = work / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        con.print("[bold]1. security team[/bold]: CA, broker certificate, ingest certificate")
        # the intermediate's key encrypted at rest, its passphrase in a file of its own
        # (CITYEDGE_CA_PASSWORD_FILE below), as production requires (ca_custody)
        passphrase = work / "ca.pass"
        passphrase.write_text(os.urandom(16).hex() + "\n")
        passphrase.chmod(0o600)
        custody = Custody(password_file=passphrase)
        init_ca(work / "root-offline", work / "ca", name="cityedge demo", custody=custody)
        (work / "ca").chmod(0o711)  # the broker reads the CRL; the CA key stays 0600
        ca = CertificateAuthority(work / "ca", custody)
        ca.write_crl([], validity_s=7 * 86400)
        bundle = work / "ca-bundle.pem"
        bundle.write_text(ca.bundle_pem())
        bundle.chmod(0o644)
        bcrt, bkey = issue_service(ca, "broker", work / "broker", ("localhost", "127.0.0.1"))
        (work / "broker").chmod(0o755)
        _mosquitto_can_read(bkey)
        _mosquitto_can_read(work / "broker")  # it writes its pid file there
        icrt, ikey = issue_service(ca, "fleet-ingest", work / "ingest")
        ccrt, ckey = issue_service(ca, "fleet-control", work / "control")
        mcrt, mkey = issue_service(ca, "fleet-commands", work / "commands")
        port = free_port()
        conf = broker.write(work / "broker", broker.BrokerFiles(bundle, bcrt, bkey, ca.crl_path),
                            port=port, bind="127.0.0.1", pid_file=work / "broker" / "pid",
                            identities=broker_acl.DEFAULT_SERVICES, share_group=SHARE_GROUP,
                            persistence_dir=work / "broker")
        _mosquitto_can_read(work / "broker" / broker.DYNSEC_FILE)  # the plugin rewrites it
        procs.start("mosquitto", [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                  str(conf)], dict(os.environ))
        wait_until(lambda: port_open(port), "mosquitto (log: %s)" % (logs / "mosquitto.log"))
        con.print("   Mosquitto on 127.0.0.1:%d: TLS, client certificates, CN as user and client "
                  "id, CRL, per-identity rules (dynamic security plugin)" % port)

        api_port = free_port()
        ota = demo_ota.offline_keys(work)  # the release manager's, made away from the fleet
        env = dict(os.environ, **ota["env"], CITYEDGE_MODE="development",
                   CITYEDGE_DATABASE_URL="sqlite:///%s" % (work / "fleet.sqlite3"),
                   CITYEDGE_CA_DIR=str(work / "ca"), CITYEDGE_CA_PASSWORD_FILE=str(passphrase),
                   CITYEDGE_BROKER_URL="mqtts://127.0.0.1:%d" % port,
                   CITYEDGE_BROKER_PID_FILE=str(work / "broker" / "pid"),
                   CITYEDGE_MQTT_PORT=str(port), CITYEDGE_MQTT_CA_FILE=str(bundle),
                   CITYEDGE_MQTT_CERT_FILE=str(icrt), CITYEDGE_MQTT_KEY_FILE=str(ikey),
                   CITYEDGE_BROKER_CONTROL_CERT_FILE=str(ccrt),
                   CITYEDGE_BROKER_CONTROL_KEY_FILE=str(ckey),
                   CITYEDGE_COMMANDS_CERT_FILE=str(mcrt), CITYEDGE_COMMANDS_KEY_FILE=str(mkey),
                   CITYEDGE_INGEST_SHARE_GROUP=SHARE_GROUP,
                   CITYEDGE_AUDIT_ANCHOR_FILE=str(work / "audit-anchor"),
                   CITYEDGE_AUDIT_KEY_FILE=str(work / "audit.key"),
                   CITYEDGE_COMMAND_KEY_FILE=str(work / "command.key"),
                   CITYEDGE_HOME=str(work / "laptop"), **demo_opendata.fleet_env(work))
        con.print("[bold]2. fleet service[/bold]: API on 127.0.0.1:%d (SQLite), ingest worker"
                  % api_port)
        cityedge(["fleet", "init-db"], env)  # the one step that creates the database
        procs.start("fleet", [str(BIN / "cityedge"), "fleet", "serve", "--port",
                              str(api_port)], env)
        url = "http://127.0.0.1:%d" % api_port
        wait_until(lambda: httpx.get(url + "/health", timeout=1).status_code == 200,
                   "the fleet service (log: %s)" % (logs / "fleet.log"))
        admin = cityedge(["fleet", "create-token", "--name", "demo-admin", "--role", "admin"],
                         env).stdout.strip()
        tech = cityedge(["fleet", "create-token", "--name", "demo-technician", "--role",
                         "technician"], env).stdout.strip()
        yield {"work": work, "env": env, "url": url, "admin": admin, "tech": tech,
               "procs": procs, "logs": logs, "broker_port": port, "ota": ota,
               "custody": custody}
    except BaseException:
        for log in sorted(logs.glob("*.log")):  # what the failing part said, before cleanup
            tail = log.read_text(errors="replace").strip().splitlines()[-8:]
            if tail:
                con.print("[dim]--- %s (last lines)[/dim]\n%s" % (log.name, "\n".join(tail)))
        raise
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def provision(con: Console, c: dict[str, Any]) -> list[Path]:
    """The technician's part: every simulated device over its serial line."""
    from cityedge_provision.simdevice import SimulatedDevice, compile_firmware

    con.print("[bold]3. field technician[/bold]: cityedge provision, one device at a time")
    cityedge(["provision", "login", "--url", c["url"], "--token-stdin"], c["env"],
             stdin=c["tech"] + "\n")
    mpy = compile_firmware(c["work"] / "firmware-mpy")
    roots = []
    for serial, urn, site in DEVICES:
        root = c["work"] / "devices" / serial
        dev = SimulatedDevice(root, mpy, serial, urn).start()
        try:
            t0 = time.monotonic()
            out = cityedge(["provision", "--port", dev.port, "--yes", "--site", site],
                           c["env"], timeout=120).stdout
        finally:
            dev.stop()
        steps = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("✓")]
        con.print("   %s (%s, site %s) on %s: %d steps in %.1f s: %s" % (
            urn, serial, site, dev.port, len(steps), time.monotonic() - t0,
            ", ".join(s.split()[1] for s in steps)))
        roots.append(root)
    return roots


def _get(url: str, headers: dict[str, str], **params: Any) -> Any:
    resp = httpx.get(url, headers=headers, params=params, timeout=10)
    if resp.status_code != 200:
        raise DemoError("GET %s answered %d: %s" % (url, resp.status_code, resp.text[:200]))
    return resp.json()


def stream(con: Console, c: dict[str, Any], roots: list[Path]) -> None:
    """The devices boot their agents; the fleet verifies and stores what they send."""
    con.print("[bold]4. devices stream[/bold] signed batches for %d s (a sweep of the sensors "
              "every %d s, %d readings a batch)" % (STREAM_SECONDS,
                                                  AGENT_SETTINGS["sample_interval_s"],
                                                  AGENT_SETTINGS["batch_readings"]))
    overrides = c["work"] / "agent.json"
    overrides.write_text(json.dumps({"agent": AGENT_SETTINGS}))
    agents = [c["procs"].start("agent-" + root.name, [
        str(BIN / "cityedge"), "sim", "device", "--root", str(root), "--config", str(overrides),
        "--seconds", str(STREAM_SECONDS)], c["env"]) for root in roots]
    for proc in agents:
        proc.wait(STREAM_SECONDS + 60)
    time.sleep(2)  # the last batches reach the ingest
    headers = {"Authorization": "Bearer " + c["admin"]}
    table = Table(title="5. verified readings in the fleet (GET /devices/{id}/readings)")
    table.add_column("device", no_wrap=True, min_width=24)
    for col in ("site", "state", "batches", "readings", "verdict"):
        table.add_column(col)
    total = 0
    latest_lines = []
    for _serial, urn, site in DEVICES:
        dev = _get(c["url"] + "/devices/" + urn, headers)
        rows = _get(c["url"] + "/devices/%s/readings" % urn, headers, limit=READINGS_PAGE)
        total += len(rows)
        latest: dict[str, str] = {}
        for r in rows:
            latest[r["name"].rsplit(":", 1)[-1]] = "%.4g %s" % (r["value"], r["unit"] or "")
        table.add_row(urn, site, dev.get("state", "?"), str(len({r["batch_seq"] for r in rows})),
                      str(len(rows)), ",".join(sorted({r["status"] for r in rows})))
        latest_lines.append("   %s: %s" % (urn, ", ".join(
            "%s %s" % kv for kv in sorted(latest.items()))))
    con.print(table)
    con.print("   latest values (each with its batch's seq and verdict in the API):")
    for line in latest_lines:
        con.print(line)
    if total == 0:
        raise DemoError("no verified readings reached the fleet (logs: %s)" % c["logs"])
    audit = cityedge(["audit", "verify"], c["env"]).stdout.strip()
    con.print("6. %s (hash chain checked row by row)" % audit)


def main(con: Console, then: Callable[[Console], None] | None = None) -> None:
    con.rule("[bold]cityedge demo, part 2: the whole system on this machine")
    try:
        with city(con) as c:
            roots = provision(con, c)
            stream(con, c, roots)
            demo_rotation.main(con, c, cityedge, BIN, c["broker_port"])
            demo_ota.main(con, c, cityedge)
            con.rule("[bold green]part 2 complete: every reading above was signed on its "
                     "device and verified by the fleet")
            if then is not None:
                then(con)
            demo_opendata.main(con, c, cityedge)
    except (DemoError, RuntimeError) as e:
        con.print("[red]cityedge: demo failed: %s[/red]" % e)
        raise SystemExit(1) from e
