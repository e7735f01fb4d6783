"""What open data publishes, and under which public names.

Rules (docs/OPEN_DATA.md), each one a place where private data could leak:

1. a device is published only at a site the city lists (``opendata_sites``) and once it
   was enrolled (not ``registered``); a reading only of a kind the city lists
   (``opendata_kinds``), matched on its SenML name alone or on ``<its device id>:<kind>``,
   with UNIX time (not seconds since boot), a numeric value, and a chain verdict in
   ``opendata_chain_statuses`` (signature verified and chain intact; no fork);
2. every identifier is a keyed HMAC-SHA256 (``PublicIds``) of the private one under a
   server secret that has no default (``load_secret``): stable across restarts, not
   reversible and not guessable without the secret, so a device id, a serial or a
   certificate serial never appears;
3. a location is the site's configured point rounded to ``opendata_location_decimals``
   (never a device's own position: the registry does not keep one);
4. the public catalogue is built from the registry and the streams the ingest keeps
   (``models.ReadingStream``) at most every ``sta_index_ttl_s`` (``OpenData.catalogue``).
"""

from __future__ import annotations

import hashlib
import hmac
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, or_
from sqlmodel import Session, col, select

from cityedge_core import batch as batchmod
from cityedge_core.errors import LocalError
from cityedge_fleet.config import OpenDataKind, Settings
from cityedge_fleet.models import STREAM_TIME_MAX, Device, DeviceState, Reading, ReadingStream
from cityedge_fleet.ratelimit import TokenBucketLimiter

SECRET_MIN_BYTES = 32  # bytes of the server secret that keys the public ids
SECRET_MAX_BYTES = 4096
PUBLIC_ID_HEX = 32  # hex characters of a public id (128 bits of the HMAC)
TIME_MAX = STREAM_TIME_MAX  # 9999-12-31T23:59:59Z: a reading time published must format


class OpenDataError(LocalError):
    """The open-data configuration cannot be used (the secret file)."""


def load_secret(path: Path) -> bytes:
    """The server secret in ``path``: a regular file open to its owner only, of
    ``SECRET_MIN_BYTES`` .. ``SECRET_MAX_BYTES`` bytes."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise OpenDataError("the open-data secret %s is not a regular file" % path)
        if st.st_mode & 0o077:
            raise OpenDataError("the open-data secret %s is open to other users (mode %o): "
                                "chmod 600 it" % (path, stat.S_IMODE(st.st_mode)))
        data = path.read_bytes()[:SECRET_MAX_BYTES + 1]
    except OSError as e:
        raise OpenDataError("cannot read the open-data secret %s: %s"
                            % (path, e.strerror)) from e
    if not SECRET_MIN_BYTES <= len(data) <= SECRET_MAX_BYTES:
        raise OpenDataError("the open-data secret %s must hold %d..%d bytes (e.g. `openssl "
                            "rand -out FILE 32`)" % (path, SECRET_MIN_BYTES, SECRET_MAX_BYTES))
    return data


class PublicIds:
    """Stable public names: HMAC-SHA256(secret, kind NUL private name ...), 128 bits hex."""

    def __init__(self, secret: bytes) -> None:
        self._key = secret

    def __repr__(self) -> str:  # never the secret
        return "<PublicIds>"

    def _mac(self, kind: str, *parts: str) -> str:
        msg = b"\x00".join([kind.encode(), *(p.encode("utf-8", "surrogatepass")
                                             for p in parts)])
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:PUBLIC_ID_HEX]

    def thing(self, device_id: str) -> str:
        return self._mac("thing", device_id)

    def datastream(self, device_id: str, kind: str) -> str:
        return self._mac("datastream", device_id, kind)

    def location(self, site: str) -> str:
        return self._mac("location", site)

    def sensor(self, model: str) -> str:
        return self._mac("sensor", model)


@dataclass(frozen=True)
class ThingEntry:
    id: str
    device_id: str
    site: str
    model: str
    hardware_class: str
    location_id: str
    sensor_id: str


@dataclass(frozen=True)
class LocationEntry:
    id: str
    site: str
    name: str
    description: str
    latitude: float
    longitude: float


@dataclass(frozen=True)
class SensorEntry:
    id: str
    model: str
    hardware_class: str


@dataclass(frozen=True)
class DatastreamEntry:
    id: str
    thing: ThingEntry
    kind: str


@dataclass
class Catalogue:
    """The published entities (all but observations, which stay in the database)."""

    things: dict[str, ThingEntry] = field(default_factory=dict)
    by_device: dict[str, ThingEntry] = field(default_factory=dict)
    locations: dict[str, LocationEntry] = field(default_factory=dict)
    sensors: dict[str, SensorEntry] = field(default_factory=dict)
    kinds: dict[str, OpenDataKind] = field(default_factory=dict)
    datastreams: dict[str, DatastreamEntry] = field(default_factory=dict)
    by_stream: dict[tuple[str, str], DatastreamEntry] = field(default_factory=dict)
    by_thing: dict[str, list[DatastreamEntry]] = field(default_factory=dict)


def kind_of(device_id: str, name: str, kinds: Iterable[str]) -> str | None:
    """The published kind of a reading's SenML name, or None (rule 1)."""
    kinds = set(kinds)
    if name in kinds:
        return name
    prefix = device_id + ":"
    if name.startswith(prefix) and name[len(prefix):] in kinds:
        return name[len(prefix):]
    return None


def public_devices(settings: Settings) -> Any:
    """The ids of the devices published (a subquery)."""
    return select(Device.id).where(col(Device.site).in_(sorted(settings.opendata_sites)),
                                   Device.state != DeviceState.registered)


def published(settings: Settings, kinds: Iterable[str] | None = None
              ) -> list[ColumnElement[bool]]:
    """The SQL conditions a published reading meets (rule 1), for ``kinds`` (all)."""
    kinds = sorted(settings.opendata_kinds if kinds is None else kinds)
    names = or_(col(Reading.name).in_(kinds),
                *[col(Reading.name) == col(Reading.device_id).concat(":" + k) for k in kinds])
    return [names, col(Reading.timebase) == batchmod.TIME_UNIX,
            col(Reading.status).in_(settings.opendata_chain_statuses),
            col(Reading.value).is_not(None), col(Reading.t) >= 0, col(Reading.t) <= TIME_MAX]


def stream_condition(stream: DatastreamEntry, settings: Settings) -> ColumnElement[bool]:
    """The readings of one datastream (index ``ix_reading_device_t`` serves it)."""
    return and_(col(Reading.device_id) == stream.thing.device_id,
                *published(settings, [stream.kind]))


def build(session: Session, settings: Settings, ids: PublicIds) -> Catalogue:
    cat = Catalogue(kinds=dict(settings.opendata_kinds))
    digits = settings.opendata_location_decimals
    for site, conf in settings.opendata_sites.items():
        lid = ids.location(site)
        cat.locations[lid] = LocationEntry(lid, site, conf.name, conf.description,
                                           round(conf.latitude, digits),
                                           round(conf.longitude, digits))
    if not settings.opendata_sites or not settings.opendata_kinds:
        return cat
    devices = session.exec(select(Device).where(
        col(Device.id).in_(public_devices(settings)))).all()
    for dev in devices:
        sensor = ids.sensor(dev.model)
        cat.sensors.setdefault(sensor, SensorEntry(sensor, dev.model, dev.hardware_class))
        thing = ThingEntry(ids.thing(dev.id), dev.id, dev.site, dev.model,
                           dev.hardware_class, ids.location(dev.site), sensor)
        cat.things[thing.id] = thing
        cat.by_device[dev.id] = thing
    # which (device, kind) pairs have a published reading: the streams the ingest keeps
    # (``ReadingStream``: one row per device, name and verdict, not a scan of the readings)
    kinds = sorted(settings.opendata_kinds)
    pairs = session.exec(
        select(ReadingStream.device_id, ReadingStream.name)
        .where(col(ReadingStream.device_id).in_(public_devices(settings)),
               col(ReadingStream.status).in_(settings.opendata_chain_statuses),
               or_(col(ReadingStream.name).in_(kinds),
                   *[col(ReadingStream.name) == col(ReadingStream.device_id).concat(":" + k)
                     for k in kinds]))
        .distinct()).all()
    for device_id, name in sorted(pairs):
        kind = kind_of(device_id, name, cat.kinds)
        owner = cat.by_device.get(device_id)
        if kind is None or owner is None or (device_id, kind) in cat.by_stream:
            continue
        stream = DatastreamEntry(ids.datastream(device_id, kind), owner, kind)
        cat.datastreams[stream.id] = stream
        cat.by_stream[(device_id, kind)] = stream
        cat.by_thing.setdefault(owner.id, []).append(stream)
    return cat


class OpenData:
    """The open-data state of one app: settings, public ids, rate limiter, catalogue."""

    def __init__(self, settings: Settings, engine: Engine, secret: bytes,
                 clock: Any = time.monotonic) -> None:
        lim = settings.limits
        self.settings = settings
        self.engine = engine
        self.ids = PublicIds(secret)
        self.limiter = TokenBucketLimiter(lim.sta_burst, lim.sta_per_s,
                                          lim.rate_limit_clients_max)
        self._clock = clock
        self._lock = threading.Lock()
        self._catalogue: Catalogue | None = None
        self._built_at = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> OpenData | None:
        """None when no secret file is configured (open data is off)."""
        if settings.opendata_secret_file is None:
            return None
        return cls(settings, engine, load_secret(settings.opendata_secret_file))

    def catalogue(self) -> Catalogue:
        with self._lock:
            now = self._clock()
            if (self._catalogue is None
                    or now - self._built_at >= self.settings.limits.sta_index_ttl_s):
                with Session(self.engine) as session:
                    self._catalogue = build(session, self.settings, self.ids)
                self._built_at = now
            return self._catalogue
