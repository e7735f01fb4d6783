"""The fleet's data model, in SQLModel families: ``Base`` -> ``Create``/``Update`` -> table
-> ``Public``.

A ``Base`` holds the fields a client may set; ``Create``/``Update`` are request bodies; the
``table=True`` class adds what only the server sets (state, times, hashes); ``Public`` is
what the API returns. Secrets (token hashes) live only on table classes and never reach a
``Public`` model. Times are timezone-aware UTC everywhere (``UTCDateTime`` restores the zone
that SQLite forgets). The Alembic migrations in ``alembic/versions`` create these tables.
"""

from __future__ import annotations

import datetime as dt
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import StringConstraints, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import AutoString, Field, SQLModel

from cityedge_core import batch as batchmod
from cityedge_core import limits, senml
from cityedge_core.command import check_name
from cityedge_core.errors import MalformedError

TEXT_MAX = 128  # characters of serial, model, site, tag, names (FleetLimits.text_max_chars)
EVENT_DETAIL_MAX = 512  # characters of an ingest event's detail or a dead letter's error
ID_MAX = 2**31 - 1  # largest integer row id (PostgreSQL INTEGER)
SITES_MAX = 64  # sites one technician token may be scoped to (FleetLimits.token_sites_max)
SiteName = Annotated[str, StringConstraints(min_length=1, max_length=TEXT_MAX)]
# control characters other than tab and newlines (PEM needs those); PostgreSQL cannot store
# NUL in text at all, and none of them belongs in a name, serial or tag
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_text(value: Any) -> None:
    """Refuse control characters anywhere in a request value (strings, lists, maps)."""
    if isinstance(value, str):
        if CONTROL_CHARACTERS.search(value):
            raise ValueError("text must not contain control characters")
    elif isinstance(value, list):
        for item in value:
            check_text(item)
    elif isinstance(value, dict):
        for item in value.values():
            check_text(item)


class InputModel(SQLModel):
    """Base of every request body: text without control characters."""

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_text(data)
        return data


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every database (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- roles


class Role(StrEnum):
    technician = "technician"
    security = "security"
    release_manager = "release-manager"
    vendor = "vendor"
    monitor = "monitor"  # a metrics scraper: GET /metrics and nothing else
    viewer = "viewer"
    admin = "admin"


# ---------------------------------------------------------------------------- devices


class DeviceState(StrEnum):
    registered = "registered"
    provisioned = "provisioned"
    active = "active"
    quarantined = "quarantined"
    retired = "retired"


class DeviceBase(InputModel):
    serial: str = Field(min_length=1, max_length=TEXT_MAX, unique=True)
    model: str = Field(min_length=1, max_length=TEXT_MAX, index=True)
    hardware_class: str = Field(min_length=1, max_length=TEXT_MAX, index=True)
    site: str = Field(default="", max_length=TEXT_MAX, index=True)
    firmware_version: str = Field(default="", max_length=TEXT_MAX, index=True)
    # the gateway this node reports through: the only device whose relay topic may carry
    # its batches (a registered device other than itself: ``registry`` checks)
    gateway_id: str | None = Field(default=None, max_length=limits.DEVICE_ID_MAX_CHARS,
                                   index=True)


def _check_urn(value: str | None) -> str | None:
    if value is not None:
        try:
            batchmod.check_device_id(value)
        except MalformedError as e:  # its message quotes the value: a 422 never echoes input
            raise ValueError("must be an RFC 9039 urn:dev: name of letters, digits and "
                             "- . _ : only") from e
    return value


def _check_tags(tags: list[str] | None) -> list[str] | None:
    if tags is None:
        return None
    if len(tags) > 32:
        raise ValueError("at most 32 tags")
    for tag in tags:
        if not 0 < len(tag) <= TEXT_MAX:
            raise ValueError("a tag has 1..%d characters" % TEXT_MAX)
    return sorted(set(tags))


class DeviceCreate(DeviceBase):
    id: str = Field(max_length=128, description="RFC 9039 device URN, e.g. urn:dev:mac:...")
    tags: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _urn(cls, value: str) -> str:
        _check_urn(value)
        return value

    @field_validator("gateway_id")
    @classmethod
    def _gateway_urn(cls, value: str | None) -> str | None:
        return _check_urn(value)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return _check_tags(value) or []


def _no_null_defaults(schema: dict[str, Any]) -> None:
    for prop in schema.get("properties", {}).values():
        if prop.get("default", "") is None:
            del prop["default"]


class DeviceUpdate(InputModel):
    """The fields to change: a field left out keeps its value; null is refused."""

    # None is only Python's "left out": SkipJsonSchema and _no_null_defaults keep it out of
    # the schema, _not_null refuses it on the wire (the columns hold text: a null was a 500)
    model_config = {"json_schema_extra": _no_null_defaults}

    model: str | SkipJsonSchema[None] = Field(default=None, min_length=1, max_length=TEXT_MAX)
    hardware_class: str | SkipJsonSchema[None] = Field(default=None, min_length=1,
                                                       max_length=TEXT_MAX)
    site: str | SkipJsonSchema[None] = Field(default=None, max_length=TEXT_MAX)
    firmware_version: str | SkipJsonSchema[None] = Field(default=None, max_length=TEXT_MAX)
    tags: list[str] | SkipJsonSchema[None] = None
    gateway_id: str | None = Field(default=None, max_length=limits.DEVICE_ID_MAX_CHARS,
                                   description="the node's gateway; null: none")

    @field_validator("model", "hardware_class", "site", "firmware_version", "tags",
                     mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null; leave the field out to keep its value")
        return value

    @field_validator("gateway_id")
    @classmethod
    def _gateway_urn(cls, value: str | None) -> str | None:
        return _check_urn(value)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str] | None) -> list[str] | None:
        return _check_tags(value)


class Device(DeviceBase, table=True):
    # keyset pages filtered by state, site or model: one index range each (migration 0013)
    __table_args__ = (Index("ix_device_state_id", "state", "id"),
                      Index("ix_device_site_id", "site", "id"),
                      Index("ix_device_model_id", "model", "id"))
    id: str = Field(primary_key=True, max_length=128)
    state: DeviceState = Field(default=DeviceState.registered, index=True, sa_type=AutoString(16))
    forgeries: int = 0  # bad-signature batches seen since the last (re)activation
    malformed: int = 0  # malformed batches and refused relays since the last (re)activation
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    # the command-key trust statement version the fleet handed out in this device's last
    # enrollment answer (``enrollment.hand_out_statement``; None: none), written by the
    # fleet itself, never taken from the device: a rotation counts a device enrolled with
    # its statement as installed (``command_key_rotation.threshold_reached``)
    trust_version: int | None = Field(default=None, sa_type=BigInteger)


class DeviceTag(SQLModel, table=True):
    __tablename__ = "device_tag"
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128)
    tag: str = Field(primary_key=True, max_length=TEXT_MAX, index=True)


class ChainPublic(SQLModel):
    last_seq: int
    missing: int  # sequence numbers not yet received (gaps still open)
    forgotten: int  # missing sequence numbers given up on (over the tracking limit)


class DevicePublic(DeviceBase):
    id: str
    state: DeviceState
    tags: list[str]
    forgeries: int
    malformed: int
    created_at: dt.datetime
    last_seen: dt.datetime | None
    chain: ChainPublic | None = None


class DevicesPublic(SQLModel):
    data: list[DevicePublic]
    next_after: str | None  # pass as ``after`` to get the next page; None on the last


class StateChange(InputModel):
    state: DeviceState
    reason: str = Field(default="", max_length=256)


# ---------------------------------------------------------------------------- credentials


class CredentialStatus(StrEnum):
    active = "active"
    suspended = "suspended"  # its device is quarantined: on the CRL as certificateHold
    revoked = "revoked"


class CredentialBase(SQLModel):
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    serial: str = Field(unique=True, max_length=64)  # certificate serial, hex
    kid: str = Field(unique=True, max_length=16)  # COSE kid of the key, hex
    public_key: str = Field(max_length=130)  # SEC1 uncompressed point, hex
    not_before: dt.datetime = Field(sa_type=UTCDateTime)
    not_after: dt.datetime = Field(sa_type=UTCDateTime)
    status: CredentialStatus = Field(default=CredentialStatus.active, sa_type=AutoString(16))
    revoked_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    # the id of the intermediate that issued it (``ca.issuer_id``); None: not known
    issuer: str | None = Field(default=None, max_length=16, index=True)


class Credential(CredentialBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    cert_pem: str = Field(sa_type=Text)


class CredentialPublic(CredentialBase):
    id: int


# ---------------------------------------------------------------------------- API tokens


VENDOR_MAX = 64  # characters of a vendor's name (a lowercase slug: ``VENDOR_NAME``)
VENDOR_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_vendor(value: str | None) -> str | None:
    if value is not None and not VENDOR_NAME.fullmatch(value):
        raise ValueError("a vendor is 1..64 of a-z 0-9 . _ - starting with a letter or digit")
    return value


class ApiTokenBase(InputModel):
    name: str = Field(min_length=1, max_length=TEXT_MAX)
    role: Role = Field(sa_type=AutoString(32))
    # a technician token scoped to these sites (``auth.Principal.may_act_at``); empty:
    # unscoped, as every other role
    sites: list[str] = Field(default_factory=list, sa_type=JSON)
    # the vendor a vendor token speaks for (its device models only: ``hw_access``); None
    # for every other role
    vendor: str | None = Field(default=None, max_length=VENDOR_MAX)


class ApiTokenCreate(ApiTokenBase):
    sites: list[SiteName] = Field(default_factory=list, max_length=SITES_MAX, description=(
        "technician tokens only: the sites it may register, change and enroll devices at"))

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str]) -> list[str]:
        return sorted(set(value))

    vendor: str | None = Field(default=None, max_length=VENDOR_MAX, description=(
        "vendor tokens only, and required for them: the vendor whose device models it "
        "uploads hardware reports for"))

    @field_validator("vendor")
    @classmethod
    def _vendor(cls, value: str | None) -> str | None:
        return check_vendor(value)

    @model_validator(mode="after")
    def _scope_is_for_technicians(self) -> ApiTokenCreate:
        if self.sites and self.role != Role.technician:
            raise ValueError("sites scope technician tokens only, not %s" % self.role.value)
        if self.role == Role.vendor and self.vendor is None:
            raise ValueError("a vendor token names its vendor (the one whose device models "
                             "it uploads hardware reports for)")
        if self.role != Role.vendor and self.vendor is not None:
            raise ValueError("only vendor tokens name a vendor, not %s" % self.role.value)
        return self


class ApiToken(ApiTokenBase, table=True):
    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)  # SHA-256 hex of the token
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked: bool = False


class ApiTokenPublic(ApiTokenBase):
    id: int
    created_by: str
    created_at: dt.datetime
    revoked: bool


class ApiTokenCreated(ApiTokenPublic):
    token: str  # shown once, never stored


# ---------------------------------------------------------------------------- enrollment


class EnrollmentTokenCreate(InputModel):
    serial: str = Field(min_length=1, max_length=TEXT_MAX)
    ttl_s: int | None = Field(default=None, gt=0)


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_token"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)
    serial: str = Field(index=True, max_length=TEXT_MAX)
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime)
    used_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)


class EnrollmentTokenCreated(SQLModel):
    serial: str
    token: str  # shown once
    expires_at: dt.datetime


CLAIM_MAX = 128  # characters of a device's claim secret (FleetLimits.claim_max_chars)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ManifestDevice(InputModel):
    """One device of a vendor's delivery: its serial and the SHA-256 (hex) of the claim
    secret the vendor put in its flash (never the secret itself)."""

    serial: str = Field(min_length=1, max_length=TEXT_MAX)
    claim_sha256: str = Field(min_length=64, max_length=64)

    @field_validator("claim_sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        if not SHA256_HEX.fullmatch(value):
            raise ValueError("claim_sha256 is a SHA-256 in 64 lowercase hex digits")
        return value


class ManifestUpload(InputModel):
    manifest: str = Field(min_length=1, max_length=TEXT_MAX)  # the vendor's delivery note id
    devices: list[ManifestDevice] = Field(min_length=1)


class ManifestAccepted(SQLModel):
    manifest: str
    added: int
    already_listed: int


class AllowedSerial(SQLModel, table=True):
    __tablename__ = "allowed_serial"
    serial: str = Field(primary_key=True, max_length=TEXT_MAX)
    manifest: str = Field(max_length=TEXT_MAX)
    added_by: str = Field(max_length=TEXT_MAX)
    added_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    used_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    # SHA-256 hex of the device's claim secret; None: listed before claims, enrolls nothing
    claim_hash: str | None = Field(default=None, max_length=64)


class EnrollRequest(InputModel):
    serial: str = Field(min_length=1, max_length=TEXT_MAX)
    token: str | None = Field(default=None, max_length=128)  # absent: allow-listed serial
    # an allow-listed serial's proof: the claim secret from the device's flash
    claim: str | None = Field(default=None, min_length=1, max_length=CLAIM_MAX)
    csr_pem: str = Field(min_length=1, max_length=8192)


class EnrollResponse(SQLModel):
    device_id: str
    certificate_pem: str
    chain_pem: str  # device certificate + intermediate
    ca_bundle_pem: str  # the root the device trusts for the broker (the root alone)
    broker_url: str
    config: dict[str, Any]
    # the fleet public keys the device trusts for commands: SEC1 uncompressed points, hex
    # (today the command key; ``command_key.trust_store``)
    fleet_keys: list[str]
    # the newest root-signed trust statement the fleet rolled out (base64, as signed;
    # ``cityedge_core.trust_statement``), None before the first command-key rotation: a
    # device that installs it holds that version, so an older statement replayed to it
    # is refused as a rollback
    trust_statement: str | None = None


class FleetKeys(SQLModel):
    """The fleet public keys devices trust for commands: SEC1 uncompressed points, hex."""

    fleet_keys: list[str]


# ---------------------------------------------------------------------------- hardware reports


class ModelRegistrationCreate(InputModel):
    """A device model (as ``Device.model`` spells it) and the vendor it belongs to."""

    name: str = Field(min_length=1, max_length=TEXT_MAX, primary_key=True)
    vendor: str = Field(min_length=1, max_length=VENDOR_MAX, index=True)

    @field_validator("vendor")
    @classmethod
    def _vendor(cls, value: str) -> str:
        check_vendor(value)
        return value


class ModelRegistration(ModelRegistrationCreate, table=True):
    """Which vendor may upload hardware reports for a device model (``hw_access``): set by
    the security team, once (a model does not change hands)."""

    __tablename__ = "model_registration"
    registered_by: str = Field(max_length=TEXT_MAX)
    registered_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelRegistrationPublic(ModelRegistrationCreate):
    registered_by: str
    registered_at: dt.datetime


HW_PROFILE_MAX = 48  # characters of a profile name (``cityedge_hardware.catalogue``)
HW_VERSION_MAX = 64  # characters of the checker's version as the report gives it


class HwReportBase(SQLModel):
    model: str = Field(max_length=TEXT_MAX)
    vendor: str = Field(max_length=VENDOR_MAX)  # the model's vendor when it was uploaded
    profile: str = Field(max_length=HW_PROFILE_MAX)
    met: bool  # recomputed by the fleet (``hw_report_check.profile_met``)
    counts: dict[str, int] = Field(sa_type=JSON)  # requirements per outcome
    catalogue_version: int
    tool_version: str = Field(max_length=HW_VERSION_MAX)
    generated_at: dt.datetime = Field(sa_type=UTCDateTime)  # as the report says
    sha256: str = Field(max_length=64)  # of the report's bytes as uploaded
    size: int  # bytes
    uploaded_by: str = Field(max_length=TEXT_MAX)
    uploaded_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class HwReport(HwReportBase, table=True):
    """A hardware report as a vendor (or the security team) uploaded it: the whole JSON,
    unchanged, with what the fleet reads from it. The newest row of a model and profile
    (highest ``id``) is the one the enrollment gate reads."""

    __tablename__ = "hw_report"
    __table_args__ = (Index("ix_hw_report_model_profile", "model", "profile", "id"),
                      Index("ix_hw_report_vendor", "vendor", "id"))
    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(foreign_key="model_registration.name", max_length=TEXT_MAX)
    report: str = Field(sa_type=Text)  # the uploaded bytes (UTF-8 JSON), unchanged


class HwReportPublic(HwReportBase):
    id: int


class HwReportsPublic(SQLModel):
    data: list[HwReportPublic]
    next_after: int | None  # pass as ``after`` to get the next page; None on the last


class HwReportDetail(HwReportPublic):
    report: dict[str, Any]  # the uploaded JSON (``GET /hw/reports/{id}/raw``: its bytes)


# ---------------------------------------------------------------------------- audit


class AuditRecord(SQLModel, table=True):
    """One row of the append-only, hash-chained audit log (see ``audit``)."""

    __tablename__ = "audit_record"
    id: int | None = Field(default=None, primary_key=True)
    at: str = Field(max_length=32)  # ISO 8601 UTC with microseconds: hashed as text
    actor: str = Field(max_length=TEXT_MAX)
    action: str = Field(max_length=64, index=True)
    target: str = Field(default="", max_length=256)
    source: str = Field(default="", max_length=64)  # client address
    outcome: str = Field(max_length=16)  # ok / denied / refused / error
    detail: str = Field(default="{}", sa_type=Text)  # canonical JSON
    prev_hash: str = Field(max_length=64)
    hash: str = Field(unique=True, max_length=64)  # HMAC-SHA256 (or legacy SHA-256), hex
    alg: str = Field(default="sha256", max_length=32)  # "hmac-sha256:<key id>" or "sha256"


class AuditPublic(SQLModel):
    id: int
    at: str
    actor: str
    action: str
    target: str
    source: str
    outcome: str
    detail: str
    prev_hash: str
    hash: str
    alg: str


class AuditVerifyResult(SQLModel):
    ok: bool
    rows: int
    problems: list[str]
    key_id: str | None = None  # the key the MACs were checked with (None: linkage only)
    keyed_rows: int = 0
    legacy_rows: int = 0  # plain SHA-256 rows from before the key (vouched for or not)
    unauthenticated_rows: int = 0  # keyed rows checked for linkage only (no key given)
    anchor: str | None = None  # the anchor file compared with, if any
    anchored_heads: int = 0


# ---------------------------------------------------------------------------- ingest


# Widths and types below hold whatever the core's SenML and chain rules accept
# (``cityedge_core.limits``): a device must not be able to send what a column refuses.


class ChainStateRow(SQLModel, table=True):
    __tablename__ = "chain_state"
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128)
    state: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # ChainState bytes
    last_seq: int = Field(sa_type=BigInteger)
    missing: int = Field(default=0, sa_type=BigInteger)  # up to SEQ_MAX
    forgotten: int = Field(default=0, sa_type=BigInteger)


class ReadingBase(SQLModel):
    t: float  # UNIX seconds (or seconds since boot when timebase = 1)
    name: str = Field(max_length=senml.NAME_MAX_CHARS)  # resolved bn + n
    unit: str | None = Field(default=None, max_length=limits.SENML_NAME_MAX_CHARS)
    value: float | None = None
    vs: str | None = Field(default=None, sa_type=Text)
    vb: bool | None = None
    vd: str | None = Field(default=None, sa_type=Text)  # data value, hex
    sum: float | None = None
    batch_seq: int = Field(sa_type=BigInteger)  # provenance: the signed batch it came in
    status: str = Field(max_length=16)  # provenance: the chain verdict of that batch
    timebase: int = 0
    via: str | None = Field(default=None, max_length=128)  # provenance: relaying gateway


class Reading(ReadingBase, table=True):
    # a device's readings by time; open data's time windows over many devices (0015)
    __table_args__ = (Index("ix_reading_device_t", "device_id", "t"), Index("ix_reading_t", "t"))
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    device_id: str = Field(max_length=128)
    # when the ingest stored it (the database's clock, ``now()`` of its transaction): the
    # partition key on PostgreSQL and what retention counts from (``reading_partitions``)
    stored_at: dt.datetime | None = Field(default=None, sa_column=Column(
        UTCDateTime, nullable=False, server_default=func.now()))


class ReadingPublic(ReadingBase):
    pass


# what ``ReadingStream`` records of a reading: a UNIX time within this range (a time open
# data can publish, ``opendata.catalogue.TIME_MAX``: 9999-12-31T23:59:59Z) and a number
STREAM_TIME_MAX = 253402300799.0


class ReadingStream(SQLModel, table=True):
    """Each (device, SenML name, chain verdict) of which at least one reading was stored
    with a UNIX time in ``0 .. STREAM_TIME_MAX`` and a numeric value: the form open data
    publishes (``opendata.catalogue.published``). The ingest adds a row in the same
    transaction as the first such reading (``ingest_store.ReadingRows``); open data's
    catalogue reads these rows instead of grouping every reading (migration 0016). Rows
    are never removed when retention drops old readings: a datastream stays listed with
    no observations left."""

    __tablename__ = "reading_stream"
    device_id: str = Field(primary_key=True, max_length=128)
    name: str = Field(primary_key=True, max_length=senml.NAME_MAX_CHARS)
    status: str = Field(primary_key=True, max_length=16)


class IngestEvent(SQLModel, table=True):
    """Anything the ingest noticed that is not a plain ``ok``: gaps, drops, forgeries."""

    __tablename__ = "ingest_event"
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=128)
    at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    status: str = Field(max_length=32)
    seq: int | None = Field(default=None, sa_type=BigInteger)
    missing: int = Field(default=0, sa_type=BigInteger)  # up to SEQ_MAX
    explained: int = Field(default=0, sa_type=BigInteger)
    detail: str = Field(default="", max_length=EVENT_DETAIL_MAX)


class IngestDeadLetter(SQLModel, table=True):
    """A message the ingest could not store even on its own while the database stored
    others: kept as received, so that nothing acknowledged is lost and an operator can run
    it again (``ingest_dead_letter.replay``) once the cause is fixed."""

    __tablename__ = "ingest_dead_letter"
    id: int | None = Field(default=None, primary_key=True)
    topic: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # UTF-8 as received
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    size: int  # bytes received (payload keeps FleetLimits.ingest_dead_letter_max_bytes)
    publisher: str | None = Field(default=None, max_length=limits.DEVICE_ID_MAX_CHARS,
                                  index=True)  # the topic's device, when it names one
    error: str = Field(default="", max_length=EVENT_DETAIL_MAX)
    first_seen: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class IngestEventPublic(SQLModel):
    device_id: str
    at: dt.datetime
    status: str
    seq: int | None
    missing: int
    explained: int
    detail: str


# ---------------------------------------------------------------------------- commands


class CommandState(StrEnum):
    """``queued -> sent -> ok | refused | failed | expired | cancelled``: ``sent`` once the
    broker handed it to the device's subscription; the outcome is the device's signed
    result; ``expired`` and ``cancelled`` are the fleet giving up (a result that arrives
    later is still recorded: it is what the device did)."""

    queued = "queued"
    sent = "sent"
    ok = "ok"
    refused = "refused"
    failed = "failed"
    expired = "expired"
    cancelled = "cancelled"


PENDING_COMMANDS = (CommandState.queued, CommandState.sent)  # still being delivered
ANSWERED_COMMANDS = (CommandState.ok, CommandState.refused, CommandState.failed)


class CommandCreate(InputModel):
    name: str = Field(min_length=1, max_length=limits.COMMAND_NAME_MAX_CHARS,
                      description="a-z 0-9 - _ . starting with a letter, e.g. status")
    args: Any = Field(default=None, description=(
        "the command's arguments (JSON: objects, lists, text, integers within 64 bits, "
        "finite numbers, booleans); at most %d bytes as CBOR" % limits.COMMAND_ARGS_MAX_BYTES))
    expires_in_s: int | None = Field(default=None, gt=0, description=(
        "seconds the command stays valid (default and most: the fleet's limits)"))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return check_name(value)
        except MalformedError as e:
            raise ValueError("a command name is a-z 0-9 - _ . starting with a letter") from e


class FleetCommand(SQLModel, table=True):
    """A signed command for one device, its delivery and the device's answer."""

    __tablename__ = "fleet_command"
    # one seq per device, ever: the backstop of the row lock that assigns it
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_fleet_command_seq"),
                      Index("ix_fleet_command_due", "state", "next_try_at"))
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    seq: int = Field(sa_type=BigInteger)  # the device refuses one not above its last
    name: str = Field(max_length=limits.COMMAND_NAME_MAX_CHARS)
    args: Any = Field(default=None, sa_type=JSON)  # as given (JSON), signed as CBOR
    signed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # the COSE_Sign1
    kid: str = Field(max_length=16)  # the command key that signed it, hex
    state: CommandState = Field(default=CommandState.queued, sa_type=AutoString(16))
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime)
    attempts: int = 0  # publishes the broker acknowledged (delivered or not)
    sends: int = 0  # of them, delivered to the device's subscription
    first_sent_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_sent_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_try_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    next_try_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    result_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    result_detail: str = Field(default="", max_length=EVENT_DETAIL_MAX)
    result_data: bytes | None = Field(default=None, sa_column=Column(LargeBinary))  # CBOR
    result_signed: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    finished_by: str = Field(default="", max_length=TEXT_MAX)  # who cancelled, or the device


class CommandPublic(SQLModel):
    id: int
    device_id: str
    seq: int
    name: str
    args: Any
    kid: str
    state: CommandState
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    attempts: int
    sends: int
    first_sent_at: dt.datetime | None
    last_sent_at: dt.datetime | None
    result_at: dt.datetime | None
    result_detail: str
    result_data: Any = None  # the device's data as JSON (bytes as hex)
    finished_by: str


# ---------------------------------------------------------------------------- key rotation


class RotationState(StrEnum):
    """``pending -> sent -> csr-received -> issued -> proven -> old-revoked``, or ``failed``
    (with the reason): ``cityedge_fleet.rotation`` moves it, ``cityedge_core.rotation``
    has the protocol."""

    pending = "pending"  # created; its rotate command not queued yet (a campaign's wave)
    sent = "sent"  # the signed rotate command is queued for the device
    csr_received = "csr-received"  # a CSR with a valid proof of the current key came
    issued = "issued"  # the new certificate is issued; install-cert queued
    proven = "proven"  # a batch signed with the new key was stored; old cert revoked
    old_revoked = "old-revoked"  # the device erased the old key: done
    failed = "failed"


OPEN_ROTATIONS = (RotationState.pending, RotationState.sent, RotationState.csr_received,
                  RotationState.issued, RotationState.proven)


class KeyRotation(SQLModel, table=True):
    """One device's move from its current key to a new one (``cityedge_fleet.rotation``)."""

    __tablename__ = "key_rotation"
    __table_args__ = (Index("ix_key_rotation_device_state", "device_id", "state"),)
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=128)
    campaign_id: int | None = Field(default=None, index=True)  # set by a campaign
    state: RotationState = Field(default=RotationState.pending, index=True,
                                 sa_type=AutoString(16))
    reason: str = Field(default="", max_length=EVENT_DETAIL_MAX)  # why it failed
    old_kid: str = Field(default="", max_length=16)  # the key being replaced, hex
    new_kid: str | None = Field(default=None, max_length=16)  # the new key's, hex
    new_serial: str | None = Field(default=None, max_length=64)  # its certificate's, hex
    csr_sha256: str | None = Field(default=None, max_length=64)
    rotate_command_id: int | None = None
    install_command_id: int | None = None
    erase_command_id: int | None = None
    proven_seq: int | None = Field(default=None, sa_type=BigInteger)  # first batch by new
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class KeyRotationPublic(SQLModel):
    id: int
    device_id: str
    campaign_id: int | None
    state: RotationState
    reason: str
    old_kid: str
    new_kid: str | None
    new_serial: str | None
    rotate_command_id: int | None
    install_command_id: int | None
    erase_command_id: int | None
    proven_seq: int | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime


class RevokeReason(StrEnum):
    """RFC 5280 §5.3.1 reasons an emergency revocation may give."""

    key_compromise = "key-compromise"
    ca_compromise = "ca-compromise"
    affiliation_changed = "affiliation-changed"
    superseded = "superseded"
    cessation_of_operation = "cessation-of-operation"
    unspecified = "unspecified"


class RevokeRequest(InputModel):
    reason: RevokeReason = RevokeReason.key_compromise
    note: str = Field(default="", max_length=256)


class RevokePublic(SQLModel):
    device_id: str
    reason: RevokeReason
    state: DeviceState
    revoked: list[str]  # certificate serials (hex) revoked now
    broker_cut: bool  # the broker was told to cut and kick the device
    crl_serials: int  # certificates the re-signed CRL lists


# ------------------------------------------------------------- command key rotation


class CommandKeyRotationState(StrEnum):
    """``rolling-out -> switched``, or ``abandoned``: ``cityedge_fleet.command_key_rotation``
    moves it; the statement's format is ``cityedge_core.trust_statement``."""

    rolling_out = "rolling-out"  # trust-update commands queued, the old key still signs
    switched = "switched"  # the new key signs from now on
    abandoned = "abandoned"  # given up (a later statement replaces it)


class CommandKeyRotation(SQLModel, table=True):
    """The fleet's move from one command key to another under a root-signed statement."""

    __tablename__ = "command_key_rotation"
    id: int | None = Field(default=None, primary_key=True)
    version: int = Field(sa_type=BigInteger, unique=True)  # the statement's
    statement: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # as signed
    statement_sha256: str = Field(max_length=64)
    old_kid: str = Field(max_length=16)  # the key that signs the trust-update commands
    new_kid: str = Field(max_length=16)
    keep_old_until: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime)  # the statement's install window
    threshold_pct: int  # share of devices that must answer ok before a plain switch
    state: CommandKeyRotationState = Field(default=CommandKeyRotationState.rolling_out,
                                           index=True, sa_type=AutoString(16))
    reason: str = Field(default="", max_length=EVENT_DETAIL_MAX)
    created_by: str = Field(max_length=TEXT_MAX)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    switched_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)


class CommandKeyRotationStart(InputModel):
    statement: str = Field(
        min_length=1, max_length=4096, regex=r"^[A-Za-z0-9+/]+=*$",
        description="the root-signed trust statement (`cityedge keys announce-command-key`), "
        "base64")
    threshold_pct: int = Field(default=100, ge=1, le=100, description=(
        "share of devices that must install it before the fleet switches keys"))


class CommandKeyRotationPublic(SQLModel):
    id: int
    version: int
    statement_sha256: str
    old_kid: str
    new_kid: str
    keep_old_until: dt.datetime | None
    expires_at: dt.datetime
    threshold_pct: int
    state: CommandKeyRotationState
    reason: str
    created_by: str
    created_at: dt.datetime
    switched_at: dt.datetime | None
    devices: int = 0  # trust-update commands queued
    installed: int = 0  # answered ok
    # handed this statement at enrollment (``Device.trust_version``), at the broker, no ok
    # answer: counted as installed towards the switch, like ``installed``
    enrolled: int = 0
    refused: int = 0  # answered refused or failed
    pending: int = 0  # queued or sent
    lapsed: int = 0  # expired or cancelled without an answer
