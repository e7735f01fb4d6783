"""The key-rotation part of ``make demo``: the security team rotates a streaming Pi
gateway's key, and the city sees it happen.

7. A Raspberry Pi gateway (``cityedge gateway run``, its identity in two key slots) is
   registered and enrolled like any device; the technician saves the enrollment answer
   and, before the first start, installs the fleet's trust statement from it
   (``cityedge gateway install-trust``, checked against the offline root's certificate,
   ``[gateway] root_cert``); a simulated SDS011 particulate sensor on a pseudo-terminal
   feeds it readings, which it signs and forwards.
8. ``cityedge keys rotate-device`` starts the rotation: the gateway makes a new key, sends
   a CSR proven by its current key, installs the new certificate, reconnects with it and
   keeps its batch chain; once the fleet has stored a batch signed with the new key it
   revokes the old certificate (CRL re-signed, broker reloaded) and tells the gateway to
   erase the old key.
9. The old certificate is refused by the broker; the readings go on under the new key.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import tty
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from cityedge_fleet.ca import ROOT_CERT
from cityedge_gateway import sds011
from cityedge_host.crypto import EcSigner

GATEWAY = ("SN-DEMO-GW01", "urn:dev:mac:b827ebfffe0de701", "harbour")
ROTATION_TIMEOUT_S = 120  # seconds the whole rotation may take on a busy machine
READINGS_TIMEOUT_S = 60  # seconds until the gateway's first (and post-rotation) readings
FRAME_INTERVAL_S = 0.5  # seconds between the simulated sensor's frames
ANSWER = "enrolled.json"  # the enrollment answer the technician saves beside the config


class Sds011Feed:
    """A simulated SDS011 on a pseudo-terminal: a frame every ``FRAME_INTERVAL_S``."""

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        link.symlink_to(os.ttyname(self.slave))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(FRAME_INTERVAL_S):
            try:
                os.write(self.master, sds011.encode_frame(80 + i % 40, 150 + i % 60))
            except OSError:
                return
            i += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


def _csr_pem(signer: EcSigner, device: str) -> str:
    key = serialization.load_pem_private_key(signer.private_pem(), password=None)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _call(method: str, url: str, token: str, **kw: Any) -> Any:
    resp = httpx.request(method, url, headers={"Authorization": "Bearer " + token},
                         timeout=10, **kw)
    if resp.status_code not in (200, 201):
        raise RuntimeError("%s %s answered %d: %s" % (method, url, resp.status_code,
                                                      resp.text[:200]))
    return resp.json()


def enroll_gateway(c: dict[str, Any], work: Path, broker_port: int,
                   who: tuple[str, str, str] = GATEWAY) -> Path:
    """Register and enroll the gateway ``who`` (serial, id, site) as a technician does;
    its key is made here (on the gateway) and a copy kept aside only to show the broker
    refusing it later."""
    serial, urn, site = who
    url, tech = c["url"], c["tech"]
    _call("POST", url + "/devices", tech, json={"id": urn, "serial": serial,
                                                "model": "ce-gw-1", "hardware_class": "rpi4",
                                                "site": site})
    token = _call("POST", url + "/enrollment/tokens", tech, json={"serial": serial})["token"]
    key = EcSigner.generate()
    resp = httpx.post(url + "/enroll", json={"serial": serial, "token": token,
                                             "csr_pem": _csr_pem(key, urn)}, timeout=10)
    if resp.status_code != 200:
        raise RuntimeError("enrollment answered %d: %s" % (resp.status_code, resp.text[:200]))
    enrolled = resp.json()
    work.mkdir(mode=0o700)
    (work / "gateway.crt").write_text(enrolled["chain_pem"])
    key.save(work / "gateway.key")
    key.save(work / "old-key-copy.pem")  # the demo's own copy, to try the old identity
    (work / "fleet0.pub").write_text(enrolled["fleet_keys"][0] + "\n")
    (work / ANSWER).write_text(json.dumps(enrolled))
    # the offline root's certificate, from `cityedge ca init`'s output (not from the
    # answer: the root is what the answer's statement is checked against)
    (work / ROOT_CERT).write_bytes((c["work"] / "ca" / ROOT_CERT).read_bytes())
    config = work / "gateway.toml"
    config.write_text("""\
[gateway]
device = "%s"
identity_dir = "identity"
fleet_keys = ["fleet0.pub"]
root_cert = "%s"
batch_readings = 10
batch_max_age_s = 2.0

[store]
path = "buffer.sqlite"

[broker]
host = "127.0.0.1"
port = %d
ca_file = "%s"
cert_file = "gateway.crt"
key_file = "gateway.key"
keepalive_s = 5

[[serial]]
name = "pm"
port = "%s"
protocol = "sds011"
""" % (urn, ROOT_CERT, broker_port, c["work"] / "ca-bundle.pem", work / "ttyUSB0"))
    return config


def install_trust(c: dict[str, Any], cityedge: Any, config: Path) -> str:
    """The technician's step before the gateway's first start: ``cityedge gateway
    install-trust`` on the saved enrollment answer; returns what it said."""
    done = cityedge(["gateway", "install-trust", str(config.parent / ANSWER), "--config",
                     str(config)], c["env"])
    return str(done.stdout.strip())


def _stored(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The gateway's stored readings (the newest page)."""
    rows: list[dict[str, Any]] = _call("GET", c["url"] + "/devices/%s/readings" % GATEWAY[1],
                                       c["admin"], params={"limit": 500})
    return rows


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise RuntimeError("no %s within %.0f s" % (what, timeout))


def _rotations(c: dict[str, Any], cityedge: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(cityedge(["keys", "rotations", GATEWAY[1],
                                                      "--json"], c["env"]).stdout)
    return rows


def old_identity_refused(work: Path, broker_port: int, ca: Path) -> bool:
    """Connect with the old certificate and the kept copy of the old key: True if the
    broker refuses (TLS 1.3 checks the client certificate after the handshake, so a
    refusal shows as a connection closed before any CONNACK)."""
    result: dict[str, Any] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=GATEWAY[1])
    client.tls_set(ca_certs=str(ca), certfile=str(work / "gateway.crt"),
                   keyfile=str(work / "old-key-copy.pem"), tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["connack"] = int(reason.value)
        done.set()

    def on_disconnect(*_a: Any) -> None:
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", broker_port, keepalive=10)
    except (OSError, ssl.SSLError):
        return True
    client.loop_start()
    done.wait(20)
    client.loop_stop()
    client.disconnect()
    return bool(result.get("connack", 1) != 0)


def main(con: Console, c: dict[str, Any], cityedge: Any, bin_dir: Path,
         broker_port: int) -> None:
    con.print("[bold]7. a Raspberry Pi gateway[/bold] enrolled, its identity in two key slots, "
              "an SDS011 on its serial line")
    work = c["work"] / "gateway"
    config = enroll_gateway(c, work, broker_port)
    con.print("   cityedge gateway install-trust: %s" % install_trust(c, cityedge, config))
    feed = Sds011Feed(work / "ttyUSB0")
    try:
        c["procs"].start("gateway", [str(bin_dir / "cityedge"), "gateway", "run", "--config",
                                     str(config)], c["env"])
        before = _wait("readings from the gateway", lambda: _stored(c), READINGS_TIMEOUT_S)
        con.print("   %s streams: %d readings stored so far" % (GATEWAY[1], len(before)))
        con.print("[bold]8. security team[/bold]: cityedge keys rotate-device %s" % GATEWAY[1])
        started = time.monotonic()
        out = cityedge(["keys", "rotate-device", GATEWAY[1]], c["env"]).stdout.strip()
        con.print("   " + out)

        def finished() -> dict[str, Any] | None:
            rows = _rotations(c, cityedge)
            state = rows[0]["state"] if rows else "?"
            if state == "failed":
                raise RuntimeError("the rotation failed: %s" % rows[0]["reason"])
            return rows[0] if state == "old-revoked" else None

        rot = _wait("finished rotation", finished, ROTATION_TIMEOUT_S)
        took = time.monotonic() - started
        n_at_revoke = len(_stored(c))
        after = _wait("readings under the new key",
                      lambda: (rows := _stored(c)) and len(rows) > n_at_revoke + 10 and rows,
                      READINGS_TIMEOUT_S)
    finally:
        feed.close()
    refused = old_identity_refused(work, broker_port, c["work"] / "ca-bundle.pem")
    seqs = sorted({r["batch_seq"] for r in after})
    statuses = sorted({r["status"] for r in after})
    unbroken = seqs == list(range(seqs[0], seqs[-1] + 1))
    table = Table(title="9. the rotation (cityedge keys rotations)", show_header=False)
    table.add_column("what")
    table.add_column("recorded")
    table.add_row("rotation", "%d: %s in %.1f s" % (rot["id"], rot["state"], took))
    table.add_row("device key", "%s -> %s" % (rot["old_kid"], rot["new_kid"] or "-"))
    table.add_row("proven by", "batch %s, the first signed with the new key" % rot["proven_seq"])
    table.add_row("old certificate", "refused by the broker" if refused
                  else "[red]still accepted by the broker[/red]")
    table.add_row("batches stored", "%d..%d, %s%s" % (
        seqs[0], seqs[-1], ",".join(statuses), ", no gap" if unbroken else " [red](gaps)[/red]"))
    con.print(table)
    on_disk = [p.name for p in (work / "identity").iterdir() if p.name.startswith("key")]
    con.print("   %d readings before the rotation, %d now; batches %d..%d all stored %s with "
              "no gap across the key change; key files left on the gateway: %s"
              % (len(before), len(after), seqs[0], seqs[-1], ",".join(statuses),
                 ", ".join(on_disk)))
    if not refused:
        raise RuntimeError("the broker still accepts the revoked certificate")
    if statuses != ["ok"] or not unbroken:
        raise RuntimeError("the gateway's batches are not all ok and unbroken: %s, %s"
                           % (statuses, seqs))
