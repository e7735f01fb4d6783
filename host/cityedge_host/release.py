"""Release tooling on CPython: root and release keys, the root-signed key list, signed
manifests, and verifying a release the way a device will (OpenSSL through
``cryptography``; the rules are the core's: ``cityedge_core.release_keys`` and
``cityedge_core.update_manifest``, called here unchanged).

Files (all written atomically; private keys mode 0600, never printed):

- ``root-<kid>.key`` / ``release-<kid>.key``: a P-256 private key, PKCS#8 PEM;
- ``root-<kid>.pub`` / ``release-<kid>.pub``: its public point, 130 hex digits (the
  form ``crypto.load_verifier`` reads);
- ``root-set.json``: the devices' trust anchor, ``{"format": ROOT_SET_FORMAT,
  "threshold": k, "roots": [{"kid": hex, "public_key": hex}, ...]}``; built into the
  firmware and the gateway package, changed only by a new firmware;
- ``release-keys.cose``: the list (COSE_Sign), ``manifest.cose``: a release (COSE_Sign1).

This module is used where the keys live (a root holder's offline laptop, the release
manager's signing host), never on the fleet server: nothing in ``cityedge_fleet``
imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cityedge_core import cbor, release_keys, update_manifest
from cityedge_core.errors import PeerError, SignatureError
from cityedge_host.crypto import EcSigner, EcVerifier, KeyFileError, public_sec1
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

ROOT_SET_FORMAT = "cityedge root-set v1"
CHUNK_BYTES = 1 << 16  # bytes read from an artifact at a time


class ReleaseError(UserError):
    """A release file or request that cannot be used as given."""


def sec1_verifier(point: bytes) -> EcVerifier:
    """``EcVerifier`` of a SEC1 point; a bad point is the peer's fault (``SignatureError``),
    as with the core's ``p256.PublicKey.from_sec1``."""
    try:
        return EcVerifier.from_sec1(point)
    except KeyFileError as e:
        raise SignatureError(str(e)) from e


# ---------------------------------------------------------------------------------------
# keys


def keygen(out_dir: Path, kind: str) -> tuple[EcSigner, Path, Path]:
    """A new P-256 key of ``kind`` (``root`` or ``release``) in ``out_dir``: private key
    (0600) and public point. Refuses to replace a file."""
    if kind not in ("root", "release"):
        raise ValueError("kind must be root or release")
    out_dir.mkdir(parents=True, exist_ok=True)
    signer = EcSigner.generate()
    key = out_dir / ("%s-%s.key" % (kind, signer.kid.hex()))
    pub = out_dir / ("%s-%s.pub" % (kind, signer.kid.hex()))
    if key.exists() or pub.exists():
        raise ReleaseError("%s already exists" % key, "choose another --out directory")
    signer.save(key)
    write_atomic(pub, public_sec1(signer.public_key).hex().encode() + b"\n", 0o644)
    return signer, key, pub


@dataclass
class RootSet:
    """The offline root keys a device trusts, and how many must sign a key list."""

    threshold: int
    points: list[bytes] = field(default_factory=list)

    @property
    def verifiers(self) -> dict[bytes, EcVerifier]:
        out = {}
        for p in self.points:
            v = sec1_verifier(p)
            out[v.kid] = v
        return out

    @property
    def kids(self) -> list[bytes]:
        return list(self.verifiers)

    def check(self) -> None:
        if not self.points or len(self.points) > release_keys.MAX_ROOTS:
            raise ReleaseError("a root set has 1 to %d keys" % release_keys.MAX_ROOTS)
        if len(set(self.points)) != len(self.points):
            raise ReleaseError("a root key is named twice")
        if not 1 <= self.threshold <= len(self.points):
            raise ReleaseError("threshold %d is not 1..%d (the root keys)"
                               % (self.threshold, len(self.points)),
                               "give --threshold at most the number of --root-pub")

    def to_json(self) -> bytes:
        self.check()
        roots = [{"kid": v.kid.hex(), "public_key": p.hex()}
                 for p, v in zip(self.points, self.verifiers.values(), strict=True)]
        doc = {"format": ROOT_SET_FORMAT, "threshold": self.threshold, "roots": roots}
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def load(cls, path: Path) -> RootSet:
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != ROOT_SET_FORMAT:
                raise ValueError("format is not %r" % ROOT_SET_FORMAT)
            points = [bytes.fromhex(r["public_key"]) for r in doc["roots"]]
            rs = cls(int(doc["threshold"]), points)
            for r, (kid, _v) in zip(doc["roots"], rs.verifiers.items(), strict=True):
                if bytes.fromhex(r["kid"]) != kid:
                    raise ValueError("kid %s is not its key's" % r["kid"])
        except OSError as e:
            raise ReleaseError("cannot read %s: %s" % (path, e.strerror)) from e
        except (ValueError, KeyError, TypeError, AttributeError, SignatureError) as e:
            raise ReleaseError("%s is not a root set: %s" % (path, e),
                               "make one with `cityedge release root-set`") from e
        rs.check()
        return rs


def read_point(path: Path) -> bytes:
    """The public point in a ``.pub`` file (or any form ``crypto.load_verifier`` reads)."""
    from cityedge_host.crypto import load_verifier

    return public_sec1(load_verifier(path).public_key)


# ---------------------------------------------------------------------------------------
# the key list


@dataclass
class CertifiedKey:
    point: bytes
    roles: Sequence[str]
    expires: int


def certify(roots: RootSet, signers: Iterable[EcSigner], keys: Sequence[CertifiedKey],
            version: int, threshold: int | None = None) -> bytes:
    """A new release-key list for ``roots``, signed by each of ``signers`` (root keys;
    more may ``cosign`` later). ``threshold`` defaults to the root set's and may not be
    lower."""
    k = roots.threshold if threshold is None else threshold
    if k < roots.threshold:
        raise ReleaseError("threshold %d is below the root set's %d (devices require %d "
                           "anyway)" % (k, roots.threshold, roots.threshold))
    if not keys:
        raise ReleaseError("a list certifies at least one release key",
                           "give --release-key-pub")
    for ck in keys:
        bad = [r for r in ck.roles if r not in release_keys.ROLES]
        if bad or not ck.roles:
            raise ReleaseError("unknown role %s" % ",".join(bad),
                               "roles are %s" % ", ".join(release_keys.ROLES))
    payload = cbor.dumps(release_keys.payload_map(
        version, k, roots.kids, [(ck.point, list(ck.roles), ck.expires) for ck in keys]))
    try:  # the device's decoder judges the payload before anyone signs it
        release_keys.decode_payload(payload, sec1_verifier)
    except release_keys.RefusedList as e:
        raise ReleaseError("this list would be refused: %s" % e.detail) from e
    sigs = []
    for s in signers:
        if s.kid not in roots.kids:
            raise ReleaseError("key %s is not a root of the root set" % s.kid.hex())
        prot = release_keys.sign_protected(s.kid)
        sigs.append((prot, s.sign(release_keys.signature_structure(b"", prot, payload))))
    if not sigs:
        raise ReleaseError("at least one root key must sign", "give --root-key")
    return release_keys.encode_list(payload, sigs)


def cosign(data: bytes, signer: EcSigner, roots: RootSet) -> bytes:
    """``data`` with ``signer``'s signature added (a root holder signing separately)."""
    if signer.kid not in roots.kids:
        raise ReleaseError("key %s is not a root of the root set" % signer.kid.hex())
    try:
        return release_keys.add_signature(data, signer, signer.kid)
    except release_keys.RefusedList as e:
        raise ReleaseError("not a release-key list: %s" % e.detail) from e


def describe_list(data: bytes) -> list[str]:
    """What a list says, for a root holder to read before signing it."""
    try:
        payload, sig_kids = release_keys.read_unverified(data)
        version, k, roots, keys = release_keys.decode_payload(payload, sec1_verifier)
    except release_keys.RefusedList as e:
        raise ReleaseError("not a release-key list: %s" % e.detail) from e
    lines = ["release-key list version %d, threshold %d of roots %s" % (
        version, k, ", ".join(r.hex() for r in roots))]
    for kid, key in keys.items():
        lines.append("  release key %s roles %s expires %s" % (
            kid.hex(), ",".join(key.roles), _utc(key.expires)))
    lines.append("  signed by %s" % (", ".join(s.hex() for s in sig_kids) or "nobody"))
    return lines


# ---------------------------------------------------------------------------------------
# manifests and artifacts


def hash_file(path: Path) -> tuple[int, bytes]:
    """``(size, sha256)`` of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise ReleaseError("cannot read %s: %s" % (path, e.strerror)) from e
    return size, h.digest()


def sign_release(signer: EcSigner, artifact: Path, component: str, version: str,
                 sequence: int, hw_classes: Sequence[str], expires: int,
                 min_version: str | None = None,
                 windows: Sequence[tuple[int, int]] | None = None) -> bytes:
    """A signed manifest for ``artifact`` (its size and SHA-256 read from the file)."""
    size, digest = hash_file(artifact)
    m = update_manifest.Manifest(component, version, sequence, list(hw_classes), size,
                                 digest, expires, min_version,
                                 list(windows) if windows else None)
    try:
        return update_manifest.sign_manifest(m, signer, signer.kid)
    except update_manifest.Refused as e:
        raise ReleaseError("this manifest would be refused: %s" % e.detail) from e


def check_artifact(path: Path, manifest: update_manifest.Manifest) -> None:
    """Stream ``path`` through the core's ``ArtifactHasher``; ``Refused`` if it is not
    the artifact the manifest names."""
    hasher = update_manifest.ArtifactHasher(manifest.size, manifest.sha256)
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                hasher.feed(chunk)
    except OSError as e:
        raise ReleaseError("cannot read %s: %s" % (path, e.strerror)) from e
    hasher.finish()


@dataclass
class Report:
    """What ``verify_release`` checked: ``ok``, ``reason`` (the core's code), ``lines``."""

    ok: bool
    reason: str
    lines: list[str]
    verdict: Any = None


def verify_release(roots: RootSet, key_list: bytes, manifest: bytes,
                   artifact: Path | None, component: str | None = None,
                   hw_class: str | None = None, installed_seq: int = 0,
                   installed_version: str | None = None, keys_version: int = 0,
                   now: int | None = None, flash_budget: int | None = None) -> Report:
    """Check a release as a device would (``update_manifest.check_update``), then the
    artifact. Device facts not given are not checked (named in the report);
    ``component`` defaults to the manifest's own."""
    now = int(time.time()) if now is None else now
    lines: list[str] = []
    if component is None:
        component = _component_of(manifest)
    policy = update_manifest.UpdatePolicy(roots.verifiers, roots.threshold, component,
                                          hw_class, flash_budget, sec1_verifier)
    verdict = policy.check(manifest, key_list, keys_version, installed_seq,
                           installed_version, now)
    if verdict.keys is not None:
        lines.append("release-key list: version %d, signed by %d of %d roots "
                     "(threshold %d): ok" % (verdict.keys.version, len(verdict.keys.signed_by),
                                             len(roots.points), max(roots.threshold,
                                                                    verdict.keys.threshold)))
    m = verdict.manifest
    if m is not None:
        lines.append("manifest: %s %s, sequence %d, for %s, %d bytes, expires %s" % (
            m.component, m.version, m.sequence, ",".join(m.hw_classes), m.size,
            _utc(m.expires)))
    if not verdict.ok:
        lines.append("%s %s: %s" % ("NOT NOW" if verdict.wait else "REFUSED", verdict.reason,
                                      verdict.detail))
        return Report(False, verdict.reason, lines, verdict)
    lines.append("signature: release key %s, role %s: ok" % (
        verdict.kid.hex(), m.component))
    lines.append("device checks: sequence above %d, unexpired%s: ok" % (
        installed_seq, (", not checked: " + ", ".join(policy.skipped))
        if policy.skipped else ""))
    if artifact is None:
        lines.append("artifact: not checked (none given)")
    else:
        try:
            check_artifact(artifact, m)
        except update_manifest.Refused as e:
            lines.append("REFUSED %s: %s" % (e.reason, e.detail))
            return Report(False, e.reason, lines, verdict)
        lines.append("artifact: %d bytes, SHA-256 %s: ok" % (m.size, m.sha256.hex()))
    return Report(True, update_manifest.OK, lines, verdict)


def _component_of(manifest: bytes) -> str:
    """The component a manifest names (unverified: only to pick the policy)."""
    from cityedge_core import cose

    try:
        payload = cbor.loads(cose.decode_sign1(
            manifest, max_bytes=update_manifest.MANIFEST_MAX_BYTES).payload,
            max_bytes=update_manifest.MANIFEST_MAX_BYTES)
        component = payload.get(update_manifest.M_COMPONENT)
    except (PeerError, AttributeError):
        component = None
    if component not in release_keys.ROLES:
        return release_keys.ROLES[0]  # the check refuses it as malformed anyway
    return str(component)


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ---------------------------------------------------------------------------------------
# the gateway's artifact


def pack_wheels(wheel_dir: Path, out: Path) -> list[str]:
    """The gateway artifact: every ``*.whl`` of ``wheel_dir`` in one tar, in name order,
    with fixed owners, modes and times, so the same wheels give the same bytes (and the
    same SHA-256). Returns the names packed."""
    wheels = sorted(p for p in wheel_dir.glob("*.whl") if p.is_file())
    if not wheels:
        raise ReleaseError("no wheels in %s" % wheel_dir,
                           "build them first: pip wheel --wheel-dir %s ." % wheel_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for w in wheels:
            info = tarfile.TarInfo(w.name)
            data = w.read_bytes()
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    write_atomic(out, buf.getvalue(), 0o644)
    return [w.name for w in wheels]
