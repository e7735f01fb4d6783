"""OTA for the fleet tests: an offline root set and a release key (``cityedge_host.release``,
the tools a release manager runs where the keys live), signed releases, and devices that
answer the fleet's signed ``update`` command as the protocol says — fetch the manifest and
the key list from the URL the command names, check the manifest's digest and
``check_update``, download the artifact in Range requests through ``ArtifactHasher``,
then report a signed result: ``ok`` (committed), ``failed`` with ``{"state":
"rolled-back"}`` (a release whose trial failed, when the device is ``breaks``), or
``refused`` with the verdict's reason. The HTTP side is the real app (a ``fetch``
callable: ``TestClient`` in process, httpx against uvicorn)."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cityedge_core import command, topics, update_manifest
from cityedge_fleet.models import FleetCommand
from cityedge_host import release
from cityedge_host.crypto import EcSigner, public_sec1

from support.campaign_sim import SimDevice, SimFleet
from support.rotation import command_args

HW_CLASS = "esp32"
RANGE_BYTES = 4096  # bytes a simulated device asks for per request

# (url, headers) -> (status, headers, body)
Fetch = Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]]


@dataclass
class ReleaseKit:
    """Two of three roots, a release key certified for both components, the root set
    written where the fleet reads it."""

    roots: list[EcSigner]
    root_set: release.RootSet
    root_set_file: Path
    key: EcSigner
    key_list: bytes
    expires: int

    @classmethod
    def make(cls, tmp: Path, *, keys_version: int = 1) -> ReleaseKit:
        roots = [EcSigner.generate() for _ in range(3)]
        rs = release.RootSet(2, [public_sec1(r.public_key) for r in roots])
        path = tmp / "root-set.json"
        path.write_bytes(rs.to_json())
        key = EcSigner.generate()
        expires = int(time.time()) + 365 * 86400
        keys = release.certify(rs, roots[:2], [release.CertifiedKey(
            public_sec1(key.public_key), ["device-firmware", "gateway"], expires)],
            keys_version)
        return cls(roots, rs, path, key, keys, expires)

    def sign(self, artifact: Path, version: str, sequence: int, *,
             component: str = "device-firmware", hw: tuple[str, ...] = (HW_CLASS,),
             key: EcSigner | None = None, expires: int | None = None) -> bytes:
        return release.sign_release(key or self.key, artifact, component, version, sequence,
                                    list(hw), expires or int(time.time()) + 30 * 86400)

    def release_body(self, manifest: bytes, keys: bytes | None = None) -> dict[str, str]:
        return {"manifest": base64.b64encode(manifest).decode(),
                "keys": base64.b64encode(keys if keys is not None else self.key_list)
                .decode()}


def write_artifact(path: Path, size: int, seed: int = 1) -> Path:
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


@dataclass
class OtaDevice:
    """What a device does with an ``update`` command (module docstring)."""

    sim: SimDevice
    kit: ReleaseKit
    fetch: Fetch
    base: str  # the fleet's public URL as the command names it
    installed_seq: int = 0
    breaks: bool = False  # its trial fails: it rolls back
    ranges: list[str] = field(default_factory=list)

    def answer(self, cmd: FleetCommand) -> list[tuple[str, bytes]]:
        url, digest = update_manifest.update_args(command_args(cmd))
        assert url.startswith(self.base)
        path = url[len(self.base):]
        _, _, manifest = self.fetch(path + "manifest", {})
        _, _, keys = self.fetch(path + "keys", {})
        try:
            update_manifest.check_manifest_digest(manifest, digest)
        except update_manifest.Refused as e:
            return [self._result(cmd, "refused", e.reason)]
        verdict = update_manifest.check_update(
            manifest, keys, self.kit.root_set.verifiers, self.kit.root_set.threshold, 0,
            "device-firmware", HW_CLASS, self.installed_seq, None, int(time.time()),
            make_verifier=release.sec1_verifier)
        if not verdict.ok:
            return [self._result(cmd, "refused", verdict.reason)]
        m = verdict.manifest
        hasher = update_manifest.ArtifactHasher(m.size, m.sha256)
        got = 0
        while got < m.size:
            rng = "bytes=%d-%d" % (got, min(m.size, got + RANGE_BYTES) - 1)
            self.ranges.append(rng)
            status, _h, body = self.fetch(path + "artifact", {"Range": rng})
            if status != 206:
                return [self._result(cmd, "failed", "download: HTTP %d" % status,
                                     {"state": "failed"})]
            hasher.feed(body)
            got += len(body)
        try:
            hasher.finish()
        except update_manifest.Refused as e:
            return [self._result(cmd, "failed", e.reason, {"state": "failed"})]
        if self.breaks:
            return [self._result(cmd, "failed", "health: the broker was not reached",
                                 {"state": "rolled-back", "sequence": m.sequence})]
        self.installed_seq = m.sequence
        return [self._result(cmd, "ok", "", {"state": "committed", "version": m.version,
                                             "sequence": m.sequence})]

    def _result(self, cmd: FleetCommand, outcome: str, detail: str,
                data: Any = None) -> tuple[str, bytes]:
        d = self.sim
        return (topics.up(d.id, topics.RESULT),
                command.encode_result(d.key, d.key.kid, cmd.name, d.id, cmd.seq, outcome,
                                      detail, data))


class OtaSimFleet(SimFleet):
    """``SimFleet`` whose devices also answer ``update`` (``OtaDevice``)."""

    def __init__(self, engine: Any, settings: Any, kit: ReleaseKit, fetch: Fetch) -> None:
        super().__init__(engine, settings)
        self.kit = kit
        self.fetch = fetch
        self.ota: dict[str, OtaDevice] = {}

    def add_devices(self, n: int, **kw: Any) -> list[str]:  # type: ignore[override]
        ids = super().add_devices(n, **kw)
        for d in ids:
            self.ota[d] = OtaDevice(self.devices[d], self.kit, self.fetch,
                                    self.settings.ota_public_url)
        return ids

    def step(self, now: Any = None) -> int:
        cmds = self.publish(now)
        msgs: list[tuple[str, bytes]] = []
        for cmd in cmds:
            if cmd.name == update_manifest.UPDATE:
                msgs.extend(self.ota[cmd.device_id].answer(cmd))
            else:
                msgs.extend(self.devices[cmd.device_id].answer(cmd))
        for i in range(0, len(msgs), 200):
            self.ingest.handle_many(msgs[i:i + 200])
        return len(cmds)


def client_fetch(client: Any) -> Fetch:
    """A ``Fetch`` over a ``TestClient`` (paths relative to the app)."""

    def fetch(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        r = client.get(path if path.startswith("/") else "/" + path, headers=headers)
        return r.status_code, dict(r.headers), r.content

    return fetch


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)


@contextlib.contextmanager
def serve_https(app: Any, pki: Any) -> Iterator[str]:
    """``app`` served over HTTPS by uvicorn in a thread (the test PKI's server
    certificate); yields its base URL."""
    import uvicorn

    from support.fleet import wait_for
    from support.mosquitto import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, ssl_certfile=str(pki.server.cert_pem),
        ssl_keyfile=str(pki.server.key_pem), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 30), "uvicorn did not start"
    try:
        yield "https://127.0.0.1:%d" % port
    finally:
        server.should_exit = True
        thread.join(10)
