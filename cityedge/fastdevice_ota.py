"""The fast device's answer to the fleet's signed ``update`` command: what a device does,
without the install (the fast device has no firmware to replace).

``update {1: url, 2: sha256(manifest)}`` (``update_manifest.update_args``): GET
``<url>manifest`` and ``<url>keys`` (bounded to the core's limits), the manifest must be
the one named (``check_manifest_digest``), then the core's ``check_update`` with the
release root set of ``release-roots.json`` in the device's directory (``cityedge release
root-set``'s file), the device's hardware class, installed sequence and key-list version
(``state.json``), and its clock. The artifact follows in ``RANGE_BYTES`` Range requests
over TLS verified against the device's ``ca.pem`` only, each body through
``ArtifactHasher`` (nothing past the signed size is taken). The answer is one signed
result: ``ok`` with ``{"state": "committed", "version", "sequence"}`` (the installed
sequence and list version are persisted first), ``refused`` with the verdict's reason,
or ``failed`` with ``{"state": "failed"}`` (a download or hash failure) or ``{"state":
"rolled-back"}`` (``trial_fails``: a test's stand-in for a release whose health check
failed, so the fleet's campaign can count rollbacks)."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from cityedge_core import command, release_keys, update_manifest
from cityedge_core.errors import PeerError
from cityedge_host import release

RANGE_BYTES = 16 * 1024  # bytes asked for per Range request
TIMEOUT_S = 10.0  # seconds: connect and read timeout of each request
COMPONENT = "device-firmware"


class FastUpdater:
    """One device's updates (``device``: a ``FastDevice``)."""

    def __init__(self, device: Any, hw_class: str = "esp32") -> None:
        self.device = device
        self.hw_class = hw_class
        self.trial_fails = False
        self.ranges: list[str] = []  # the Range headers asked, in order

    @property
    def roots_file(self) -> Path:
        return Path(self.device.dir) / "release-roots.json"

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(Path(self.device.dir) / "ca.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _get(self, http: httpx.AsyncClient, url: str, most: int,
                   headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of a GET; PeerError past ``most`` bytes (none kept)."""
        async with http.stream("GET", url, headers=headers or {}) as r:
            body = b""
            async for chunk in r.aiter_raw():
                body += chunk
                if len(body) > most:
                    raise PeerError("%s: more than %d bytes" % (url[-20:], most))
            return r.status_code, body

    async def update(self, args: Any) -> tuple[str, str, Any]:
        url, digest = update_manifest.update_args(args)  # PeerError: refused
        if not self.roots_file.is_file():
            return command.REFUSED, "no release root set on this device", None
        roots = release.RootSet.load(self.roots_file)
        state = self.device.state
        async with httpx.AsyncClient(verify=self._tls(), timeout=TIMEOUT_S,
                                     trust_env=False, follow_redirects=False) as http:
            try:
                _, manifest = await self._get(http, url + "manifest",
                                              update_manifest.MANIFEST_MAX_BYTES)
                _, keys = await self._get(http, url + "keys", release_keys.LIST_MAX_BYTES)
                update_manifest.check_manifest_digest(manifest, digest)
            except update_manifest.Refused as e:
                return command.REFUSED, e.reason, None
            except (httpx.HTTPError, PeerError) as e:
                return command.FAILED, "fetch: %s" % e, {"state": "failed"}
            verdict = update_manifest.check_update(
                manifest, keys, roots.verifiers, roots.threshold,
                int(state.get("release_keys_version", 0)), COMPONENT, self.hw_class,
                int(state.get("installed_seq", 0)), state.get("installed_version"),
                int(self.device.clock()), make_verifier=release.sec1_verifier)
            if not verdict.ok:
                return command.REFUSED, verdict.reason, None
            m = verdict.manifest
            hasher = update_manifest.ArtifactHasher(m.size, m.sha256)
            got = 0
            try:
                while got < m.size:
                    rng = "bytes=%d-%d" % (got, min(m.size, got + RANGE_BYTES) - 1)
                    self.ranges.append(rng)
                    code, body = await self._get(http, url + "artifact", RANGE_BYTES,
                                                 {"Range": rng, "Accept-Encoding": "identity"})
                    if code != 206 or not body:
                        return (command.FAILED, "download: HTTP %d" % code,
                                {"state": "failed"})
                    hasher.feed(body)
                    got += len(body)
                hasher.finish()
            except update_manifest.Refused as e:
                return command.FAILED, e.reason, {"state": "failed"}
            except (httpx.HTTPError, PeerError) as e:
                return command.FAILED, "download: %s" % e, {"state": "failed"}
        if self.trial_fails:
            return (command.FAILED, "health: the release did not reach the broker",
                    {"state": "rolled-back", "sequence": m.sequence})
        state["installed_seq"] = m.sequence
        state["installed_version"] = m.version
        state["release_keys_version"] = verdict.keys.version
        state["installed_at"] = int(time.time())
        self.device._save_state()
        return (command.OK, "%s %s committed" % (m.component, m.version),
                {"state": "committed", "version": m.version, "sequence": m.sequence})
