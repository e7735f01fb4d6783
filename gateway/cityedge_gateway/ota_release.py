"""What the update installer is given: a release that has already been verified.

The signed manifest (component, version, sequence, hardware class, size, SHA-256, expiry)
is checked elsewhere, in the one place that accepts or refuses it; this package starts
from its result, ``VerifiedRelease``. The fields are checked again here only for what the
installer does with them: the version names a directory (so it must be a plain name, never
a path), the size bounds the download, the digest is exactly 32 bytes, the URL is HTTPS.
Breaking one of those is a caller's mistake (``ValueError``), not a peer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import limits

COMPONENT = "gateway"  # what this installer installs: the Raspberry Pi gateway agent

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]*\Z")
SEQUENCE_MAX = 2**53  # a sequence number survives JSON (the state file) exactly


@dataclass(frozen=True)
class VerifiedRelease:
    """One release for this gateway, as the manifest verifier accepted it."""

    component: str
    version: str
    sequence: int  # monotonic per component: the anti-rollback number
    size: int  # bytes of the artifact
    sha256: bytes  # digest of the artifact
    url: str  # https:// where the artifact is served (any server with Range support)
    # the version of the release-key list the manifest was verified under: recorded with
    # the release and, once it commits, the floor below which no key list is taken
    keys_version: int = 0

    def __post_init__(self) -> None:
        v = self.version
        if (not isinstance(v, str) or len(v) > limits.OTA_VERSION_MAX_CHARS
                or not _VERSION.match(v) or ".." in v):
            raise ValueError("version %r is not a plain name of at most %d characters"
                             % (v, limits.OTA_VERSION_MAX_CHARS))
        if isinstance(self.sequence, bool) or not 0 < self.sequence <= SEQUENCE_MAX:
            raise ValueError("sequence %r is not in 1..2**53" % (self.sequence,))
        if not 0 < self.size <= limits.OTA_ARTIFACT_MAX_BYTES:
            raise ValueError("size %r is not in 1..%d bytes"
                             % (self.size, limits.OTA_ARTIFACT_MAX_BYTES))
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise ValueError("sha256 must be 32 bytes")
        if isinstance(self.keys_version, bool) or not 0 <= self.keys_version <= SEQUENCE_MAX:
            raise ValueError("keys_version %r is not in 0..2**53" % (self.keys_version,))
        if not self.url.startswith("https://"):
            raise ValueError("the artifact URL must be https://, got %r" % self.url[:64])


def from_verdict(verdict: Any, url: str) -> VerifiedRelease:
    """The release a manifest verdict accepted (``cityedge_core.update_manifest``:
    ``UpdatePolicy(..., component="gateway", hw_class=...).check(...)``), to be fetched
    from ``url``. A verdict that is not ``ok`` (refused, or "wait": no trusted clock,
    outside its install window) gives no release: ``ValueError`` naming its reason."""
    if not verdict.ok:
        raise ValueError("the manifest was not accepted: %s (%s)"
                         % (verdict.reason, verdict.detail))
    m = verdict.manifest
    if m.component != COMPONENT:
        raise ValueError("the manifest is for %r, not the gateway" % (m.component,))
    return VerifiedRelease(m.component, m.version, m.sequence, m.size, bytes(m.sha256), url,
                           verdict.keys.version)
