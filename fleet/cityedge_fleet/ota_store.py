"""Releases, the artifact store and OTA campaigns in the database and on disk (the policy
is ``ota``'s, I/O-free).

**Artifacts** are files under ``<ota_dir>/artifacts/<sha256 hex>`` (content-addressed),
received in pieces (``ArtifactUpload``: never held whole in memory, at most
``ota_artifact_max_bytes``), hashed as they arrive and renamed into place by the host's
atomic writer only when the SHA-256 is the one announced; otherwise nothing is kept.

**A release** (``create_release``) is a signed manifest and the root-signed release-key
list. The fleet checks them with the core's ``UpdatePolicy`` for no device in particular
(no hardware class, no flash budget, installed sequence 0, now) against the root set of
``ota_root_set_file``: the list signed by the roots' threshold and not older than a list
it holds, the manifest signed by a release key of that list with the role of its
component, unexpired; then that it raises the component's highest sequence by at most
``ota_max_sequence_jump``, that no release has its component and sequence, and that the
stored artifact streams through ``ArtifactHasher`` (size and SHA-256). The fleet holds no
release or root private key: it can refuse a release, never make one.

**A campaign** (``create_campaign``) takes its members now: active devices the selector
matches whose hardware class the release names. ``advance`` is one round (``ota.decide``):
a member started gets a download capability (``token_bytes`` random bytes, URL-safe; the
database keeps its SHA-256) and a signed ``update`` command through the command queue
with ``{1: "<ota_public_url>/ota/d/<token>/", 2: sha256(manifest)}``
(``cityedge_core.update_manifest.update_args``). The capability is the device's key to
its release's three files (``delivery``): another device, not given it, cannot fetch
them, and nobody can list releases there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, LargeBinary, UniqueConstraint, func
from sqlmodel import AutoString, Field, Session, SQLModel, col, select

from cityedge_core import cbor, cose, release_keys, update_manifest
from cityedge_core.errors import PeerError, SignatureError
from cityedge_fleet import audit, campaign_store, command_queue, ota
from cityedge_fleet.campaign import (
    LIMITS as CLIMITS,
)
from cityedge_fleet.campaign import (
    CampaignError,
    CampaignState,
    SelectorError,
    parse_max_failures,
    parse_selector,
    transition,
)
from cityedge_fleet.config import Settings
from cityedge_fleet.models import (
    EVENT_DETAIL_MAX,
    TEXT_MAX,
    DeviceState,
    FleetCommand,
    UTCDateTime,
    utcnow,
)
from cityedge_host.crypto import EcSigner, EcVerifier, KeyFileError
from cityedge_host.files import AtomicFile, atomic_writer

M = ota.MemberStatus
ROOT_SET_FORMAT = "cityedge root-set v1"  # ``cityedge_host.release.ROOT_SET_FORMAT``
_HEX64 = frozenset("0123456789abcdef")


class OtaError(ValueError):
    """A release or campaign refused: ``status`` for the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- tables


class OtaRelease(SQLModel, table=True):
    __tablename__ = "ota_release"
    __table_args__ = (UniqueConstraint("component", "sequence"),)
    id: int | None = Field(default=None, primary_key=True)
    component: str = Field(max_length=32)
    version: str = Field(max_length=32)
    sequence: int = Field(sa_type=BigInteger)
    hw_classes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    size: int = Field(sa_type=BigInteger)
    sha256: str = Field(max_length=64, index=True)  # the artifact's, hex
    manifest_sha256: str = Field(max_length=64, unique=True)
    manifest: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    key_list: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    keys_version: int
    kid: str = Field(max_length=64)  # the release key's, hex
    expires_at: dt.datetime = Field(sa_type=UTCDateTime)
    uploaded_by: str = Field(max_length=TEXT_MAX)
    uploaded_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class OtaCampaign(SQLModel, table=True):
    __tablename__ = "ota_campaign"
    id: int | None = Field(default=None, primary_key=True)
    release_id: int = Field(foreign_key="ota_release.id", index=True)
    selector: str = Field(max_length=1024)
    state: CampaignState = Field(default=CampaignState.running, index=True,
                                 sa_type=AutoString(16))
    waves_text: str = Field(max_length=128)  # as given
    waves: list[int] = Field(sa_column=Column(JSON, nullable=False))  # cumulative counts
    success: str = Field(max_length=16)  # as given: "90%"
    success_pct: float
    wave: int = 0
    max_failures: str = Field(max_length=16)
    allowed_failures: int
    members: int
    reason: str = Field(default="", max_length=EVENT_DETAIL_MAX)
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class OtaMember(SQLModel, table=True):
    __tablename__ = "ota_member"
    campaign_id: int = Field(primary_key=True, foreign_key="ota_campaign.id")
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128,
                           index=True)
    position: int
    wave: int | None = None
    command_id: int | None = None  # its ``update`` command
    token_hash: str | None = Field(default=None, max_length=64, unique=True)
    progress: str = Field(default="", max_length=16)  # downloading / downloaded
    status: ota.MemberStatus = Field(default=M.waiting, sa_type=AutoString(16))
    reason: str = Field(default="", max_length=EVENT_DETAIL_MAX)


# ------------------------------------------------------------------------- root set


@dataclass(frozen=True)
class Roots:
    verifiers: dict[bytes, EcVerifier]
    threshold: int


def _verifier(point: bytes) -> EcVerifier:
    try:
        return EcVerifier.from_sec1(point)
    except KeyFileError as e:
        raise SignatureError(str(e)) from e


def load_roots(settings: Settings) -> Roots:
    """The root set of ``ota_root_set_file`` (public keys only); OtaError 503 without it."""
    path = settings.ota_root_set_file
    if path is None:
        raise OtaError(503, "no root set is configured (CITYEDGE_OTA_ROOT_SET_FILE: the "
                       "root-set.json of `cityedge release root-set`): no release can be "
                       "checked, so none is taken")
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("format") != ROOT_SET_FORMAT:
            raise ValueError("format is not %r" % ROOT_SET_FORMAT)
        verifiers = {}
        for r in doc["roots"]:
            v = _verifier(bytes.fromhex(r["public_key"]))
            if bytes.fromhex(r["kid"]) != v.kid:
                raise ValueError("kid %s is not its key's" % r["kid"])
            verifiers[v.kid] = v
        k = int(doc["threshold"])
        if not verifiers or not 1 <= k <= len(verifiers):
            raise ValueError("threshold %d of %d roots" % (k, len(verifiers)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SignatureError) as e:
        raise OtaError(503, "the root set %s cannot be used: %s" % (path, e)) from e
    return Roots(verifiers, k)


# ------------------------------------------------------------------------- artifacts


def artifacts_dir(settings: Settings) -> Path:
    return settings.ota_dir / "artifacts"


def check_sha256_hex(text: str) -> str:
    t = text.strip().lower()
    if len(t) != 64 or not set(t) <= _HEX64:
        raise OtaError(422, "sha256: 64 hex digits")
    return t


def artifact_path(settings: Settings, sha256_hex: str) -> Path:
    return artifacts_dir(settings) / check_sha256_hex(sha256_hex)


class ArtifactUpload:
    """One artifact arriving in pieces: ``feed`` each, then ``finish`` (kept under its
    digest if it is ``sha256_hex``) or ``abort``. OtaError 413 past ``max_bytes``, 422 for
    another digest; nothing is kept then."""

    def __init__(self, settings: Settings, sha256_hex: str) -> None:
        self.sha256_hex = check_sha256_hex(sha256_hex)
        self.max_bytes = settings.limits.ota_artifact_max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        d = artifacts_dir(settings)
        d.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self._file: AtomicFile = self._stack.enter_context(atomic_writer(
            d / self.sha256_hex, 0o644, tmp_suffix=".%s.part" % secrets.token_hex(6)))

    def feed(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.max_bytes:
            self.abort()
            raise OtaError(413, "the artifact is larger than %d bytes" % self.max_bytes)
        self.size += len(chunk)
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> int:
        if not hmac.compare_digest(self._hash.hexdigest(), self.sha256_hex):
            self.abort()
            raise OtaError(422, "the artifact's SHA-256 is %s, not the %s announced: not "
                           "kept" % (self._hash.hexdigest(), self.sha256_hex))
        if self.size == 0:
            self.abort()
            raise OtaError(422, "the artifact is empty")
        self._stack.close()
        return self.size

    def abort(self) -> None:
        self._file.abandon()
        self._stack.close()


def read_chunks(path: Path, first: int, last: int, chunk: int) -> Iterator[bytes]:
    """Bytes ``first..last`` of ``path`` in pieces of at most ``chunk``."""
    with path.open("rb") as f:
        f.seek(first)
        left = last - first + 1
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                return
            left -= len(data)
            yield data


# ---------------------------------------------------------------------------- releases


def _component_of(manifest: bytes) -> str:
    """The component a manifest names (unverified: only to pick the policy)."""
    try:
        payload = cbor.loads(cose.decode_sign1(
            manifest, max_bytes=update_manifest.MANIFEST_MAX_BYTES).payload,
            max_bytes=update_manifest.MANIFEST_MAX_BYTES)
        component = payload.get(update_manifest.M_COMPONENT)
    except (PeerError, AttributeError):
        component = None
    if component not in release_keys.ROLES:
        return str(release_keys.ROLES[0])  # the check refuses it as malformed anyway
    return str(component)


def create_release(session: Session, settings: Settings, *, manifest: bytes,
                   key_list: bytes, by: str, now: dt.datetime | None = None) -> OtaRelease:
    """Check and store a release (module docstring); OtaError says why not. The caller
    audits and commits."""
    now = now or utcnow()
    roots = load_roots(settings)
    newest_keys = session.exec(select(func.max(OtaRelease.keys_version))).one() or 0
    policy = update_manifest.UpdatePolicy(roots.verifiers, roots.threshold,
                                          _component_of(manifest), None, None, _verifier)
    verdict = policy.check(manifest, key_list, newest_keys, 0, None, int(now.timestamp()))
    if not verdict.ok and verdict.reason != update_manifest.OUTSIDE_WINDOW:
        # outside_window is the devices' clock's business, and the last rule: all passed
        raise OtaError(422, "release refused: %s (%s)" % (verdict.reason, verdict.detail))
    m = verdict.manifest
    highest = session.exec(select(func.max(OtaRelease.sequence)).where(
        col(OtaRelease.component) == m.component)).one() or 0
    cap = settings.limits.ota_max_sequence_jump
    if m.sequence - highest > cap:
        raise OtaError(422, "release refused: sequence %d is %d above the highest %s "
                       "release the fleet holds (%d); one release may raise it by at most "
                       "%d (CITYEDGE_LIMITS__OTA_MAX_SEQUENCE_JUMP): a device never takes a "
                       "lower sequence again" % (m.sequence, m.sequence - highest,
                                                 m.component, highest, cap))
    same = session.exec(select(OtaRelease).where(col(OtaRelease.component) == m.component,
                                                 col(OtaRelease.sequence) == m.sequence)
                        ).first()
    if same is not None:
        raise OtaError(409, "release %d already has %s sequence %d" % (same.id or 0,
                                                                      m.component,
                                                                      m.sequence))
    path = artifact_path(settings, m.sha256.hex())
    if not path.is_file():
        raise OtaError(409, "no artifact %s in the store: upload it first (`cityedge ota "
                       "release upload --artifact`, PUT /ota/artifacts)" % m.sha256.hex())
    hasher = update_manifest.ArtifactHasher(m.size, m.sha256)
    try:
        for chunk in read_chunks(path, 0, path.stat().st_size - 1, ota.LIMITS.chunk_bytes):
            hasher.feed(chunk)
        hasher.finish()
    except update_manifest.Refused as e:
        raise OtaError(422, "release refused: the stored artifact is not the manifest's: "
                       "%s" % e) from e
    row = OtaRelease(component=m.component, version=m.version, sequence=m.sequence,
                     hw_classes=list(m.hw_classes), size=m.size, sha256=m.sha256.hex(),
                     manifest_sha256=hashlib.sha256(manifest).hexdigest(),
                     manifest=manifest, key_list=key_list, keys_version=verdict.keys.version,
                     kid=bytes(verdict.kid).hex(),
                     expires_at=dt.datetime.fromtimestamp(m.expires, dt.UTC),
                     uploaded_by=by, uploaded_at=now)
    session.add(row)
    session.flush()
    return row


def release_public(r: OtaRelease) -> dict[str, Any]:
    return {"id": r.id, "component": r.component, "version": r.version,
            "sequence": r.sequence, "hw_classes": list(r.hw_classes), "size": r.size,
            "sha256": r.sha256, "manifest_sha256": r.manifest_sha256,
            "keys_version": r.keys_version, "kid": r.kid,
            "expires_at": r.expires_at.isoformat(), "uploaded_by": r.uploaded_by,
            "uploaded_at": r.uploaded_at.isoformat()}


def get_release(session: Session, release_id: int) -> OtaRelease:
    rel = session.get(OtaRelease, release_id)
    if rel is None:
        raise OtaError(404, "no release %d" % release_id)
    return rel


def releases(session: Session, *, limit: int = 100) -> list[OtaRelease]:
    return list(session.exec(select(OtaRelease).order_by(col(OtaRelease.id).desc())
                             .limit(limit)))


# --------------------------------------------------------------------------- campaigns


@dataclass
class Selection:
    selector: str
    selected: list[str]
    left_out: dict[str, int] = field(default_factory=dict)


def preview(session: Session, rel: OtaRelease, selector_text: str,
            now: dt.datetime) -> Selection:
    """The devices a campaign of ``rel`` would take now, and the matching ones left out."""
    try:
        selector = parse_selector(selector_text)
    except SelectorError as e:
        raise OtaError(422, "select: %s" % e) from e
    out = Selection(selector.text(), [])
    t = now.timestamp()
    for facts, _cred in campaign_store.device_facts(session):
        if not selector.matches(facts, t):
            continue
        if facts.state != DeviceState.active:
            why = "not active (%s)" % facts.state
        elif facts.hardware_class not in rel.hw_classes:
            why = "hardware class not in the release (%s)" % (facts.hardware_class or "none")
        else:
            out.selected.append(facts.id)
            continue
        out.left_out[why] = out.left_out.get(why, 0) + 1
    return out


def create_campaign(session: Session, settings: Settings, *, release_id: int,
                    selector_text: str, waves: str, success: str, max_failures: str,
                    by: str, confirmed: bool, now: dt.datetime | None = None
                    ) -> OtaCampaign:
    """A running OTA campaign (module docstring); the caller audits and commits."""
    now = now or utcnow()
    if settings.ota_public_url is None:
        raise OtaError(409, "no CITYEDGE_OTA_PUBLIC_URL: devices would not know where to "
                       "fetch the release")
    rel = get_release(session, release_id)
    if rel.expires_at <= now:
        raise OtaError(409, "release %d expired at %s: devices would refuse it"
                       % (release_id, rel.expires_at.isoformat()))
    seen = preview(session, rel, selector_text, now)
    n = len(seen.selected)
    if n == 0:
        raise OtaError(422, "the selector %s takes no device (left out: %s)"
                       % (seen.selector, json.dumps(seen.left_out)))
    if n > CLIMITS.members_max:
        raise OtaError(422, "%d devices; a campaign takes at most %d"
                       % (n, CLIMITS.members_max))
    if n > CLIMITS.confirm_over and not confirmed:
        raise OtaError(409, "%d devices is over %d: confirm" % (n, CLIMITS.confirm_over))
    try:
        cumulative = ota.parse_waves(waves, n)
        pct = ota.parse_success(success)
        allowed = parse_max_failures(max_failures, n)
    except CampaignError as e:
        raise OtaError(e.status, str(e)) from e
    camp = OtaCampaign(release_id=release_id, selector=seen.selector, waves_text=waves,
                       waves=cumulative, success=success.strip(), success_pct=pct,
                       max_failures=max_failures.strip(), allowed_failures=allowed,
                       members=n, created_by=by, created_at=now, updated_at=now)
    session.add(camp)
    session.flush()
    for i, dev in enumerate(seen.selected):
        session.add(OtaMember(campaign_id=camp.id or 0, device_id=dev, position=i))
    session.flush()
    return camp


def get_campaign(session: Session, campaign_id: int, *, lock: bool = False) -> OtaCampaign:
    query = select(OtaCampaign).where(col(OtaCampaign.id) == campaign_id)
    if lock:
        query = query.with_for_update()
    camp = session.exec(query).first()
    if camp is None:
        raise OtaError(404, "no OTA campaign %d" % campaign_id)
    return camp


def members_of(session: Session, campaign_id: int) -> list[OtaMember]:
    return list(session.exec(select(OtaMember).where(
        col(OtaMember.campaign_id) == campaign_id).order_by(col(OtaMember.position))))


def _result_state(data: bytes | None) -> str:
    if not data:
        return ""
    try:
        value = cbor.loads(data)
    except PeerError:
        return ""
    state = value.get("state") if isinstance(value, dict) else None
    return state if isinstance(state, str) else ""


def refresh(session: Session, rows: list[OtaMember]) -> None:
    """Each started member's status from its command and its recorded progress."""
    ids = [m.command_id for m in rows if m.command_id is not None]
    cmds: dict[int, ota.CommandFacts] = {}
    for i in range(0, len(ids), 500):
        for c in session.exec(select(FleetCommand).where(
                col(FleetCommand.id).in_(ids[i:i + 500]))):
            cmds[c.id or 0] = ota.CommandFacts(str(c.state), c.sends, c.attempts,
                                               c.result_detail, _result_state(c.result_data))
    for m in rows:
        if m.command_id is None:
            continue
        status, reason = ota.member_status(cmds.get(m.command_id), m.progress)
        if status == M.waiting:
            continue
        if status != m.status or reason != m.reason:
            m.status = status
            m.reason = reason[:EVENT_DETAIL_MAX]
            session.add(m)


def _view(m: OtaMember) -> ota.Member:
    return ota.Member(m.device_id, M(m.status), m.wave)


def advance(session: Session, campaign_id: int, *, signer: EcSigner, settings: Settings,
            now: dt.datetime | None = None) -> ota.Plan:
    """One round of a campaign, in the caller's transaction."""
    now = now or utcnow()
    camp = get_campaign(session, campaign_id, lock=True)
    rows = members_of(session, campaign_id)
    refresh(session, rows)
    plan = ota.decide(CampaignState(camp.state), camp.wave, camp.waves, camp.success_pct,
                      camp.allowed_failures, [_view(m) for m in rows])
    by = "ota-campaign:%d" % campaign_id
    if plan.state != camp.state:
        _set_state(session, camp, plan.state, by, plan.why, now,
                   ota.counts(_view(m) for m in rows))
    if plan.wave != camp.wave:
        camp.wave = plan.wave
        camp.updated_at = now
        session.add(camp)
        audit.append(session, actor=by, action="ota.campaign.wave", outcome=audit.OK,
                     target=by, detail={"wave": plan.wave, "devices": len(plan.start)})
    if plan.start:
        rel = get_release(session, camp.release_id)
        wanted = set(plan.start)
        for m in rows:
            if m.device_id in wanted:
                _start(session, camp, rel, m, signer=signer, settings=settings, now=now)
    return plan


def update_command_args(settings: Settings, token: str, rel: OtaRelease) -> dict[int, Any]:
    """The ``update`` command's wire arguments (``update_manifest.update_args``)."""
    url = "%s/ota/d/%s/" % (settings.ota_public_url, token)
    args = {update_manifest.A_URL: url,
            update_manifest.A_MANIFEST_SHA256: bytes.fromhex(rel.manifest_sha256)}
    update_manifest.update_args(args)  # what every device checks first: never send less
    return args


def _start(session: Session, camp: OtaCampaign, rel: OtaRelease, m: OtaMember, *,
           signer: EcSigner, settings: Settings, now: dt.datetime) -> None:
    by = "ota-campaign:%d" % (camp.id or 0)
    m.wave = camp.wave
    token = secrets.token_urlsafe(ota.LIMITS.token_bytes)
    try:
        with session.begin_nested():
            cmd = command_queue.queue(
                session, signer=signer, device_id=m.device_id, name=update_manifest.UPDATE,
                args={"campaign": camp.id, "release": rel.id, "version": rel.version,
                      "manifest_sha256": rel.manifest_sha256},
                wire_args=update_command_args(settings, token, rel),
                expires_in_s=settings.limits.ota_command_expires_s, created_by=by,
                lim=settings.limits, now=now)
    except command_queue.CommandError as e:
        m.status = M.failed
        m.reason = ("not started: %s" % e)[:EVENT_DETAIL_MAX]
        session.add(m)
        audit.append(session, actor=by, action="ota.campaign.start_device",
                     outcome=audit.REFUSED, target=m.device_id, detail={"why": str(e)})
        return
    m.command_id = cmd.id
    m.token_hash = hashlib.sha256(token.encode()).hexdigest()
    m.status = M.pending
    m.reason = ""
    session.add(m)


def _set_state(session: Session, camp: OtaCampaign, state: CampaignState, by: str,
               why: str, now: dt.datetime, tally: dict[str, int] | None = None) -> None:
    was = camp.state
    camp.state = state
    camp.reason = why[:EVENT_DETAIL_MAX]
    camp.updated_at = now
    session.add(camp)
    audit.append(session, actor=by, action="ota.campaign.%s" % state.value,
                 outcome=audit.OK, target="ota-campaign:%d" % (camp.id or 0),
                 detail={"from": str(was), "why": why, **({"members": tally} if tally
                                                         else {})})


def act(session: Session, campaign_id: int, action: str, *, by: str,
        now: dt.datetime | None = None) -> OtaCampaign:
    """pause, resume or abort; abort cancels the ``update`` commands not delivered yet
    (those members are ``missed``); the caller commits."""
    now = now or utcnow()
    camp = get_campaign(session, campaign_id, lock=True)
    try:
        to = transition(CampaignState(camp.state), action)
    except CampaignError as e:
        raise OtaError(e.status, str(e)) from e
    _set_state(session, camp, to, by, "%s by %s" % (action, by), now)
    if to == CampaignState.aborted:
        for m in members_of(session, campaign_id):
            if m.command_id is None:
                continue
            cmd = command_queue.get_locked(session, m.command_id)
            if cmd is not None and cmd.sends == 0 and cmd.state in ("queued", "sent"):
                command_queue.cancel(session, cmd, by=by)
    return camp


def live_ids(session: Session) -> list[int]:
    return [c for c in session.exec(select(OtaCampaign.id).where(
        col(OtaCampaign.state).in_((CampaignState.running, CampaignState.paused)))
        .order_by(col(OtaCampaign.id))) if c is not None]


def campaigns(session: Session, *, limit: int = 100) -> list[OtaCampaign]:
    return list(session.exec(select(OtaCampaign).order_by(col(OtaCampaign.id).desc())
                             .limit(limit)))


def status(session: Session, campaign_id: int, *, devices: bool = False) -> dict[str, Any]:
    """A campaign's progress, read live from its commands (not committed)."""
    camp = get_campaign(session, campaign_id)
    rel = get_release(session, camp.release_id)
    rows = members_of(session, campaign_id)
    refresh(session, rows)
    views = [_view(m) for m in rows]
    got, need = ota.wave_gate(camp.wave, camp.success_pct, views) if camp.wave else (0, 0)
    out: dict[str, Any] = {
        "id": camp.id, "release": release_public(rel), "selector": camp.selector,
        "state": str(camp.state), "reason": camp.reason, "wave": camp.wave,
        "waves": list(camp.waves), "waves_text": camp.waves_text, "success": camp.success,
        "wave_committed": got, "wave_needed": need, "members": camp.members,
        "max_failures": camp.max_failures, "allowed_failures": camp.allowed_failures,
        "created_by": camp.created_by, "created_at": camp.created_at.isoformat(),
        "updated_at": camp.updated_at.isoformat(), "counts": ota.counts(views),
        "failed": [{"device_id": m.device_id, "wave": m.wave, "status": str(m.status),
                    "reason": m.reason} for m in rows if m.status in ota.FAILURES],
        "offline": [m.device_id for m in rows if m.status == M.offline],
    }
    if devices:
        out["devices"] = [{"device_id": m.device_id, "wave": m.wave,
                           "status": str(m.status), "command": m.command_id,
                           "reason": m.reason} for m in rows]
    return out


# ---------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Delivery:
    campaign_id: int
    device_id: str
    release: OtaRelease


def delivery(session: Session, token: str) -> Delivery | None:
    """The member a download capability belongs to, and its release (None: no such)."""
    if not 16 <= len(token) <= 64:
        return None
    digest = hashlib.sha256(token.encode()).hexdigest()
    m = session.exec(select(OtaMember).where(col(OtaMember.token_hash) == digest)).first()
    if m is None or m.token_hash is None or not hmac.compare_digest(m.token_hash, digest):
        return None
    camp = session.get(OtaCampaign, m.campaign_id)
    if camp is None:
        return None
    return Delivery(m.campaign_id, m.device_id, get_release(session, camp.release_id))


def note_progress(session: Session, d: Delivery, progress: ota.MemberStatus) -> None:
    """Record that the device fetched (part of) its release; only ever forward."""
    m = session.get(OtaMember, (d.campaign_id, d.device_id))
    if m is None or m.status in ota.FINISHED:
        return
    order = ("", M.downloading.value, M.downloaded.value)
    if order.index(progress.value) > order.index(m.progress or ""):
        m.progress = progress.value
        session.add(m)
        session.commit()
