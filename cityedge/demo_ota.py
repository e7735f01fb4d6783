"""The update part of ``make demo``: signed releases reach two Pi gateways in waves.

Before the city starts (``offline_keys``): the release manager's offline ceremony — three
root keys, a root set that needs two of them, a release key certified by two roots — and
the fleet is told where the root set is and at which https:// address devices fetch
releases (``CITYEDGE_OTA_*``).

10. The gateway of the rotation demo and a second one, enrolled now, are run as systemd
    runs them (``ServiceLoop``: the unit's boot guard, then ``/opt/cityedge/current/bin/
    cityedge gateway run``, started again whenever it exits non-zero), from a factory image
    holding release 1.0.0, with ``[update]`` in their configs (the release root set, their
    hardware class, a trial of at most two starts).
11. The release manager signs gateway release 1.1.0 where the release key lives
    (``cityedge release sign``), uploads it (``cityedge ota release upload``: the fleet
    checks it as a device would) and starts a campaign in two waves (``cityedge ota
    campaign create --waves 50%,100%``: one gateway, then both).
12. The fleet sends each gateway of the wave a signed ``update`` command naming its
    download URL (an HTTPS front before the fleet: any TLS proxy or CDN does this in
    production); the gateway checks the manifest, downloads the artifact in Range
    requests, switches to 1.1.0 in trial and restarts; 1.1.0 proves its health (a signed
    batch acknowledged by the broker), commits and answers the command; the second wave
    starts once the first committed; the campaign ends ``done``.
13. A broken release 1.2.0 (it fails at every start) goes out the same way: the first
    wave's gateway starts it twice, the boot guard rolls back to 1.1.0, which answers
    ``rolled-back``; with no failure allowed the campaign halts, and the second gateway
    never receives it.
14. The campaign's status, each gateway's record and the releases each one started.

A demo release is this same code with a new version number (its ``bin/cityedge`` runs
this interpreter): the point is the way it travels, checked at every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from cityedge import demo_rotation
from cityedge_fleet.ca import CertificateAuthority, issue_service
from cityedge_host import release
from cityedge_host.crypto import EcSigner, public_sec1
from cityedge_host.ports import free_port

HW_CLASS = "rpi4"  # the demo gateway's hardware class (``demo_rotation.enroll_gateway``)
CAMPAIGN_TIMEOUT_S = 120  # seconds from the campaign to the gateway's commit
STARTS_MAX = 12  # starts of a gateway the service loop makes at most
GATEWAY2 = ("SN-DEMO-GW02", "urn:dev:mac:b827ebfffe0de702", "old-town")
CLI = """#!/bin/sh
echo "%(version)s $$" >> "${CITYEDGE_DEMO_STARTS:-%(starts)s}"
exec "%(python)s" -m cityedge.cli "$@"
"""
CRASH = """#!/bin/sh
echo "%(version)s $$ crash" >> "${CITYEDGE_DEMO_STARTS:-%(starts)s}"
exit 1
"""
PYTHON = """#!/bin/sh
exec "%(python)s" "$@"
"""


def offline_keys(work: Path) -> dict[str, Any]:
    """The release manager's offline ceremony (before the city starts); returns the
    files and the fleet's ``CITYEDGE_OTA_*`` settings."""
    keys = work / "release-keys"
    keys.mkdir(mode=0o700)
    roots = [EcSigner.generate() for _ in range(3)]
    root_set = release.RootSet(2, [public_sec1(r.public_key) for r in roots])
    (keys / "root-set.json").write_bytes(root_set.to_json())
    key = EcSigner.generate()
    key.save(keys / "release.key")
    expires = int(time.time()) + 365 * 86400
    (keys / "release-keys.cose").write_bytes(release.certify(root_set, roots[:2], [
        release.CertifiedKey(public_sec1(key.public_key), ["gateway"], expires)], 1))
    front = free_port()
    return {"dir": keys, "front_port": front, "env": {
        "CITYEDGE_OTA_DIR": str(work / "ota-store"),
        "CITYEDGE_OTA_ROOT_SET_FILE": str(keys / "root-set.json"),
        "CITYEDGE_OTA_PUBLIC_URL": "https://127.0.0.1:%d" % front}}


class TlsFront:
    """An HTTPS front for the fleet's plain HTTP port (what nginx, a TLS proxy or a CDN
    does in production): TLS ends here, bytes go through unchanged."""

    def __init__(self, cert: Path, key: Path, port: int, backend: int) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.port, self.backend = port, backend
        self.loop = asyncio.new_event_loop()
        self.up = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TlsFront:
        self.thread.start()
        if not self.up.wait(10):
            raise RuntimeError("the HTTPS front did not start")
        return self

    def _run(self) -> None:
        async def main() -> None:
            server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port,
                                                ssl=self.ctx)
            self.up.set()
            async with server:
                await server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            self.loop.run_until_complete(main())

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            back_r, back_w = await asyncio.open_connection("127.0.0.1", self.backend)
        except OSError:
            writer.close()
            return

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()

        await asyncio.gather(pump(reader, back_w), pump(back_r, writer))

    def stop(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(10)


class ServiceLoop:
    """systemd's part for the gateway (``gateway/cityedge-gateway.service``): before each
    start the boot guard from ``previous``, then ``current/bin/cityedge gateway run``;
    started again when it exits non-zero (75: a new release is installed)."""

    def __init__(self, root: Path, config: Path, log: Path, starts: Path) -> None:
        self.root, self.config, self.log = root, config, log
        # where each release notes its starts (the demo's, per gateway)
        self.env = dict(os.environ, CITYEDGE_DEMO_STARTS=str(starts))
        self.exits: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ServiceLoop:
        self.thread.start()
        return self

    def _run(self) -> None:
        with self.log.open("ab") as out:
            for _ in range(STARTS_MAX):
                guard = self.root / "previous" / "bin" / "python"
                if guard.exists():
                    subprocess.run([str(guard), "-m", "cityedge_gateway.ota_boot",
                                    str(self.root)], stdout=out, stderr=out, timeout=60)
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.proc = subprocess.Popen(
                        [str(self.root / "current" / "bin" / "cityedge"), "gateway", "run",
                         "--config", str(self.config)], stdout=out, stderr=out, env=self.env)
                rc = self.proc.wait()
                if self._stop.is_set():
                    return
                self.exits.append(rc)
                if rc == 0:
                    return

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.thread.join(30)


def release_tree(version: str, starts: Path, crash: bool = False
                 ) -> dict[str, tuple[str, int]]:
    """The files of a demo release: ``bin/cityedge`` (notes each start; ``crash``: then
    fails, as a broken release does at every start), ``bin/python`` (the boot guard's
    interpreter), ``VERSION``."""
    values = {"version": version, "starts": starts, "python": sys.executable}
    return {"bin/cityedge": ((CRASH if crash else CLI) % values, 0o755),
            "bin/python": (PYTHON % values, 0o755), "VERSION": (version + "\n", 0o644)}


def pack(files: dict[str, tuple[str, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, (text, mode) in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def factory_image(root: Path, starts: Path) -> None:
    """``root`` as a Pi leaves the factory: release 1.0.0, ``current`` at it."""
    d = root / "releases" / "1.0.0"
    for name, (text, mode) in release_tree("1.0.0", starts).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
        (d / name).chmod(mode)
    (d / "RELEASE").write_text(json.dumps({"version": "1.0.0", "sequence": 1}))
    os.symlink("releases/1.0.0", root / "current")


def _stop_named(procs: Any, name: str) -> None:
    for n, proc in procs.running:
        if n == name and proc.poll() is None:
            proc.terminate()
            proc.wait(20)


def _under_systemd(c: dict[str, Any], gw: Path, name: str) -> dict[str, Path]:
    """Gateway directory ``gw`` (its ``gateway.toml`` written by enrollment) made a Pi
    from the factory (release 1.0.0) with ``[update]`` in its config."""
    root, starts = gw / "opt-cityedge", gw / "starts.log"
    root.mkdir()
    factory_image(root, starts)
    (gw / "release-roots.json").write_bytes((c["ota"]["dir"] / "root-set.json").read_bytes())
    with (gw / "gateway.toml").open("a") as out:
        out.write('\n[update]\nroot = "%s"\ntrial_deadline_s = 60\ntrial_max_starts = 2\n'
                  'release_roots = "release-roots.json"\nhw_class = "%s"\nbuild = "copy"\n'
                  % (root, HW_CLASS))
    return {"root": root, "starts": starts, "config": gw / "gateway.toml",
            "log": c["logs"] / ("%s-service.log" % name)}


def _release(c: dict[str, Any], cityedge: Any, version: str, sequence: int,
             starts: Path, crash: bool = False) -> dict[str, Any]:
    """``cityedge release sign`` then ``cityedge ota release upload``: the release's row."""
    ota, env, work = c["ota"], c["env"], c["work"]
    art = work / ("gateway-%s.tar.gz" % version)
    art.write_bytes(pack(release_tree(version, starts, crash)))
    manifest = work / ("gateway-%s.manifest" % version)
    cityedge(["release", "sign", "--key", str(ota["dir"] / "release.key"), "--artifact",
              str(art), "--component", "gateway", "--version", version, "--sequence",
              str(sequence), "--hw-class", HW_CLASS, "--expires", "+14d", "--out",
              str(manifest)], env)
    up: dict[str, Any] = json.loads(cityedge(
        ["ota", "release", "upload", "--manifest", str(manifest), "--keys",
         str(ota["dir"] / "release-keys.cose"), "--artifact", str(art), "--json"],
        env).stdout)
    return up


def _campaign(c: dict[str, Any], cityedge: Any, release_id: int) -> tuple[int, str]:
    """``cityedge ota campaign create``: two waves (one gateway, then both), every member
    of a wave committed before the next, the first rollback or failure halts it."""
    out = cityedge(["ota", "campaign", "create", "--release", str(release_id), "--select",
                    "hardware-class=%s" % HW_CLASS, "--waves", "50%,100%", "--success",
                    "100%", "--max-failures", "0"], c["env"]).stdout.strip()
    m = re.search(r"OTA campaign (\d+)", out)
    if m is None:
        raise RuntimeError("cityedge ota campaign create said: %s" % out)
    return int(m[1]), out.splitlines()[0]


def main(con: Console, c: dict[str, Any], cityedge: Any) -> None:
    ota, work = c["ota"], c["work"]
    con.print("[bold]10. two gateways under systemd[/bold]: the rotation's and %s, enrolled "
              "now; factory release 1.0.0, \\[update] in their configs" % GATEWAY2[1])
    _stop_named(c["procs"], "gateway")
    demo_rotation.install_trust(c, cityedge, demo_rotation.enroll_gateway(
        c, work / "gateway2", c["broker_port"], GATEWAY2))
    gws = {demo_rotation.GATEWAY[1]: _under_systemd(c, work / "gateway", "gateway"),
           GATEWAY2[1]: _under_systemd(c, work / "gateway2", "gateway2")}
    ca = CertificateAuthority(work / "ca", c["custody"])
    cert, key = issue_service(ca, "ota-front", work / "ota-front", ("localhost", "127.0.0.1"))
    front = TlsFront(cert, key, ota["front_port"], int(c["url"].rsplit(":", 1)[1])).start()
    # the new gateway's sensor: it is active (in a campaign) once its first batch is stored
    feed = demo_rotation.Sds011Feed(work / "gateway2" / "ttyUSB0")
    services = {d: ServiceLoop(g["root"], g["config"], g["log"], g["starts"]).start()
                for d, g in gws.items()}
    try:
        _wait_active(c, GATEWAY2[1])
        con.print("[bold]11. release manager[/bold]: cityedge release sign, cityedge ota "
                  "release upload, cityedge ota campaign create --waves 50%,100%")
        starts = work / "starts.log"  # (the service loops name each gateway's own)
        up = _release(c, cityedge, "1.1.0", 2, starts)
        cid, said = _campaign(c, cityedge, up["id"])
        con.print("   release %s: gateway %s, seq %s, %d bytes, sha256 %s...; %s" % (
            up["id"], up["version"], up["sequence"], up["size"], up["sha256"][:16], said))
        t0 = time.monotonic()
        st = _wait_campaign(c, cid)
        took = time.monotonic() - t0
        _table(con, "12. the update in two waves (cityedge ota campaign status)", cid, st,
               gws, services, "%.1f s from the campaign to done (signed answers included)"
               % took)
        if st["state"] != "done" or st["counts"].get("committed") != len(gws):
            raise RuntimeError("the gateways did not both commit release 1.1.0 (logs: %s)"
                               % ", ".join(str(g["log"]) for g in gws.values()))
        con.print("[bold]13. a broken release[/bold]: 1.2.0 crashes at every start; its "
                  "campaign's first wave rolls back and halts it")
        broken = _release(c, cityedge, "1.2.0", 3, starts, crash=True)
        cid, said = _campaign(c, cityedge, broken["id"])
        con.print("   release %s: gateway 1.2.0, seq 3; %s" % (broken["id"], said))
        t0 = time.monotonic()
        st = _wait_campaign(c, cid)
        took = time.monotonic() - t0
        _table(con, "14. the broken release (cityedge ota campaign status)", cid, st, gws,
               services, "%.1f s from the campaign to halted" % took)
        if st["state"] != "halted" or st["counts"].get("rolled-back") != 1:
            raise RuntimeError("the broken release was not rolled back by one gateway and "
                               "halted: %s %s" % (st["state"], st["counts"]))
    finally:
        for service in services.values():
            service.stop()
        front.stop()
        feed.close()


def _table(con: Console, title: str, cid: int, st: dict[str, Any],
           gws: dict[str, dict[str, Path]], services: dict[str, ServiceLoop],
           took: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("recorded")
    table.add_row("campaign %d" % cid, "%s%s: %s" % (
        st["state"], (" (%s)" % st["reason"]) if st.get("reason") else "",
        ", ".join("%s %d" % kv for kv in st["counts"].items() if kv[1])))
    for dev in st.get("devices") or []:
        d = dev["device_id"]
        state = json.loads((gws[d]["root"] / "state.json").read_text()) \
            if (gws[d]["root"] / "state.json").exists() else {}
        table.add_row(d, "wave %s: %s%s; the gateway's record: %s %s" % (
            dev.get("wave") or "-", dev.get("status", "?"),
            (": " + dev["reason"]) if dev.get("reason") else "",
            state.get("state", "-"), state.get("installed_version", "1.0.0")))
    for d, g in gws.items():
        ran = [" ".join(line.split()[::2]) for line in g["starts"].read_text().splitlines()] \
            if g["starts"].exists() else []
        table.add_row("%s started" % d[-6:], "%s  (exits %s; 75: restart into the new "
                      "release)" % (" -> ".join(ran), ",".join(map(str, services[d].exits))))
    table.add_row("took", took)
    con.print(table)


def _campaign_id(c: dict[str, Any]) -> int:
    rows = _api(c, "/ota/campaigns")
    return int(rows[0]["id"])


def _api(c: dict[str, Any], path: str, **params: Any) -> Any:
    r = httpx.get(c["url"] + path, params=params, timeout=10,
                  headers={"Authorization": "Bearer " + c["admin"]})
    if r.status_code != 200:
        raise RuntimeError("GET %s answered %d: %s" % (path, r.status_code, r.text[:200]))
    return r.json()


def _wait_active(c: dict[str, Any], device: str) -> None:
    deadline = time.monotonic() + demo_rotation.READINGS_TIMEOUT_S
    while _api(c, "/devices/%s" % device)["state"] != "active":
        if time.monotonic() > deadline:
            raise RuntimeError("%s sent no batch within %d s" % (
                device, demo_rotation.READINGS_TIMEOUT_S))
        time.sleep(0.5)


def _wait_campaign(c: dict[str, Any], cid: int) -> dict[str, Any]:
    deadline = time.monotonic() + CAMPAIGN_TIMEOUT_S
    while True:
        st: dict[str, Any] = _api(c, "/ota/campaigns/%d" % cid, devices=True)
        counts = st["counts"]
        if st["state"] in ("halted", "aborted", "done"):  # the runner's next round
            return st
        if time.monotonic() > deadline:
            raise RuntimeError("the campaign did not finish within %d s: %s"
                               % (CAMPAIGN_TIMEOUT_S, counts))
        time.sleep(0.5)
