"""The fleet's signed ``update`` command, taken by the gateway up to the switch.

``take_update(args, installer, ...)``: the command's arguments
(``cityedge_core.update_manifest.update_args``: an https folder URL and the manifest's
SHA-256) -> GET ``<url>manifest`` and ``<url>keys`` over TLS verified against the
configured CA only, each bounded to the core's limits -> the manifest must be the one the
command names (``check_manifest_digest``) -> ``check_update`` (component ``gateway``,
this gateway's hardware class, the release root set of ``roots_file``, the installed
sequence, version and release-key list version from the installer's record, now) ->
``ota_release.from_verdict`` with ``<url>artifact`` (the release carries the key list's
version, which the installer records and makes the floor at commit: a key list older than
the one a committed release came with is refused, ``keys_rollback``) ->
``Installer.update`` (the Range download, resumed and retried within ``bounds``:
``download_limits`` of the ``[update]`` section; side-by-side build, the switch into
``trial``). The caller then exits with ``EXIT_RESTART``. The manifest and the key list
are fetched with the same retries (a 5xx, a 429 after its ``Retry-After``, a lost link),
within the same bounds.

Refusals are ``UpdateRefused`` with the core's reason code (the signed result's detail:
``refused``); a fetch or install failure is ``UpdateFailed`` (``failed``). A *wait*
verdict (no clock, outside the install window) is a refusal for now: the fleet's
campaign counts it, and a later campaign sends the release again.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from cityedge_core import release_keys, update_manifest
from cityedge_host.backoff import Backoff
from cityedge_host.release import RootSet, sec1_verifier

from .config import UpdateConfig
from .ota_download import DownloadError, DownloadLimits, Observer, retry_after_s
from .ota_install import Installer, InstallFailed, ReleaseRefused
from .ota_release import COMPONENT, from_verdict
from .ota_state import UpdateRecord

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # seconds: connect and read timeout of the manifest and key list


class UpdateRefused(Exception):
    """The release may not be installed here; ``reason``: the core's code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason


class UpdateFailed(Exception):
    """The release could not be fetched or installed; the running release is unchanged."""


class _Transient(Exception):
    """A fetch worth trying again: a 5xx, a 429, the link."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _get_once(client: httpx.Client, url: str, most: int) -> bytes:
    name = url.rsplit("/", 1)[-1]
    try:
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise _Transient("%s: HTTP %d" % (name, r.status_code),
                                 retry_after_s(r.headers.get("retry-after")))
            if r.status_code != 200:
                raise UpdateFailed("%s: HTTP %d" % (name, r.status_code))
            body = b""
            for chunk in r.iter_raw():
                body += chunk
                if len(body) > most:
                    raise UpdateFailed("%s: more than %d bytes" % (name, most))
            return body
    except httpx.TransportError as e:
        if isinstance(e, httpx.ConnectError) and "CERTIFICATE" in str(e).upper():
            raise UpdateFailed("%s: the server's certificate is not from the configured CA: "
                               "%s" % (name, e)) from e
        raise _Transient("%s: %s: %s" % (name, type(e).__name__, e)) from e


def _get(client: httpx.Client, url: str, most: int, b: DownloadLimits,
         stop: threading.Event) -> bytes:
    """GET a small file of the release folder, retried as the artifact's requests are: a
    5xx, a 429 (no sooner than its ``Retry-After``) or a lost link, after a backoff wait,
    up to ``b.attempts_max`` tries within ``b.deadline_s``."""
    backoff = Backoff(b.retry_first_s, max(b.retry_first_s, b.retry_max_s))
    started = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return _get_once(client, url, most)
        except _Transient as e:
            asked = e.retry_after or 0.0
            wait = max(backoff.next(), asked)
            if tries >= b.attempts_max:
                raise UpdateFailed("%s (%d tries, the limit)" % (e, tries)) from e
            if asked > b.retry_after_max_s:
                raise UpdateFailed("%s; the server asks to wait %.0f s, more than %.0f s"
                                   % (e, asked, b.retry_after_max_s)) from e
            if time.monotonic() + wait - started > b.deadline_s:
                raise UpdateFailed("%s; waiting %.1f s more would pass the deadline of "
                                   "%.0f s" % (e, wait, b.deadline_s)) from e
            log.warning("fetching the release: %s; again in %.1f s", e, wait)
            if stop.wait(wait):
                raise UpdateFailed("%s; the gateway is stopping" % e) from e


def download_limits(u: UpdateConfig) -> DownloadLimits:
    """The artifact download's bounds as the ``[update]`` section sets them."""
    return DownloadLimits(deadline_s=u.download_deadline_s, attempts_max=u.download_attempts,
                          retry_max_s=u.download_backoff_max_s)


def take_update(args: Any, installer: Installer, *, roots_file: Path, hw_class: str,
                ca_file: Path, now: int | None = None,
                bounds: DownloadLimits | None = None,
                observe: Observer | None = None,
                stop: threading.Event | None = None) -> UpdateRecord:
    """Check and install the release an ``update`` command names (module docstring)."""
    url, digest = update_manifest.update_args(args)  # PeerError: the command is malformed
    b = bounds or DownloadLimits()
    halt = stop or threading.Event()
    roots = RootSet.load(roots_file)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with httpx.Client(verify=ctx, timeout=TIMEOUT_S, trust_env=False,
                          follow_redirects=False) as client:
            manifest = _get(client, url + "manifest", update_manifest.MANIFEST_MAX_BYTES,
                            b, halt)
            keys = _get(client, url + "keys", release_keys.LIST_MAX_BYTES, b, halt)
    except httpx.HTTPError as e:
        raise UpdateFailed("fetching the release: %s" % e) from e
    try:
        update_manifest.check_manifest_digest(manifest, digest)
    except update_manifest.Refused as e:
        raise UpdateRefused(e.reason, e.detail) from e
    rec = installer.record()
    verdict = update_manifest.check_update(
        manifest, keys, roots.verifiers, roots.threshold, rec.installed_keys_version,
        COMPONENT, hw_class, rec.installed_sequence, rec.installed_version or None,
        int(time.time()) if now is None else now, make_verifier=sec1_verifier)
    if not verdict.ok:
        raise UpdateRefused(verdict.reason, verdict.detail)
    release = from_verdict(verdict, url + "artifact")
    try:
        return installer.update(release, ca_file=ca_file, bounds=bounds, observe=observe,
                                stop=stop)
    except ReleaseRefused as e:
        raise UpdateRefused("installer", str(e)) from e
    except (DownloadError, InstallFailed) as e:
        raise UpdateFailed(str(e)) from e
