"""SensorThings query options and the entity sets they run on.

``Options.parse`` reads ``$filter $top $skip $orderby $expand $select $count`` with their
limits (``QueryError``: 400; unknown or repeated ``$`` options are refused too). The five
small entity sets (Things, Locations, Sensors, ObservedProperties, Datastreams) come from
the public catalogue and are filtered, ordered and paged in memory; Observations are
readings in the database, queried with the filter turned into SQL with bound parameters
(``sta_filter.compare`` over columns) under the publication rules of
``catalogue.published``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, not_, or_
from sqlmodel import Session, col, select

from cityedge_core.errors import PeerError
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.models import Reading
from cityedge_fleet.opendata import sta_filter
from cityedge_fleet.opendata.catalogue import (
    Catalogue,
    DatastreamEntry,
    PublicIds,
    kind_of,
    public_devices,
    published,
    stream_condition,
)
from cityedge_fleet.opendata.sta_filter import Type

OPTIONS = ("$filter", "$top", "$skip", "$orderby", "$expand", "$select", "$count",
           "$skiptoken")
# ``$skiptoken`` (OData's server-driven paging): the sort value and id of the last
# observation of the page before, ``<value>_<id>``; the next page starts right after it
# through the index instead of counting ``$skip`` rows again
_SKIPTOKEN = re.compile(r"^(-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:e[+-]?[0-9]{1,3})?)?_([0-9]{1,19})$")
KEYSET = ("phenomenonTime", "resultTime", "result", "@iot.id", "id")
SIGNATURE = "ES256 COSE_Sign1 verified by the fleet ingest"
MEASUREMENT = "http://www.opengis.net/def/observationType/OGC-OM/2.0/OM_Measurement"
_NAMED: dict[str, Type] = {"@iot.id": "text", "id": "text", "name": "text",
                           "description": "text"}
SCHEMAS: dict[str, dict[str, Type]] = {
    "Things": _NAMED, "Locations": _NAMED, "Sensors": _NAMED, "ObservedProperties": _NAMED,
    "Datastreams": _NAMED,
    "Observations": {"@iot.id": "integer", "id": "integer", "phenomenonTime": "time",
                     "resultTime": "time", "result": "number"},
}
# navigation: entity set -> {link name: (target set, one entity?)}
NAVIGATION: dict[str, dict[str, tuple[str, bool]]] = {
    "Things": {"Locations": ("Locations", False), "Datastreams": ("Datastreams", False)},
    "Locations": {"Things": ("Things", False)},
    "Sensors": {"Datastreams": ("Datastreams", False)},
    "ObservedProperties": {"Datastreams": ("Datastreams", False)},
    "Datastreams": {"Thing": ("Things", True), "Sensor": ("Sensors", True),
                    "ObservedProperty": ("ObservedProperties", True),
                    "Observations": ("Observations", False)},
    "Observations": {"Datastream": ("Datastreams", True)},
}
FIELDS: dict[str, tuple[str, ...]] = {
    "Things": ("name", "description", "properties"),
    "Locations": ("name", "description", "encodingType", "location"),
    "Sensors": ("name", "description", "encodingType", "metadata"),
    "ObservedProperties": ("name", "definition", "description"),
    "Datastreams": ("name", "description", "unitOfMeasurement", "observationType"),
    "Observations": ("phenomenonTime", "resultTime", "result", "parameters"),
}


class QueryError(PeerError):
    """A query option breaks a rule (answered 400)."""


@dataclass(frozen=True)
class Options:
    filter: sta_filter.Node | None
    top: int
    skip: int
    orderby: tuple[tuple[str, bool], ...]  # (property, descending)
    expand: tuple[str, ...]
    select: tuple[str, ...]
    count: bool
    after: tuple[float, int] | None = None  # from $skiptoken: (sort value, id)

    def keyset(self) -> bool:
        """Can the next page start after the last row (one sort property at most)?"""
        return len(self.orderby) <= 1 and all(p in KEYSET for p, _ in self.orderby)

    @classmethod
    def parse(cls, entity_set: str, params: Sequence[tuple[str, str]],
              limits: FleetLimits) -> Options:
        seen: dict[str, str] = {}
        for key, value in params:
            if key not in OPTIONS:
                raise QueryError("unknown query option; the options are %s"
                                 % " ".join(OPTIONS))
            if key in seen:
                raise QueryError("%s is given more than once" % key)
            seen[key] = value
        schema = SCHEMAS[entity_set]
        node = None
        if "$filter" in seen:
            node = sta_filter.parse(seen["$filter"], schema, sta_filter.FilterLimits(
                limits.sta_filter_max_chars, limits.sta_filter_max_depth,
                limits.sta_filter_max_terms, limits.sta_literal_max_chars))
        top = _count_option("$top", seen.get("$top"), limits.sta_page_default,
                            limits.sta_page_max)
        skip = _count_option("$skip", seen.get("$skip"), 0, limits.sta_skip_max)
        orderby = []
        for part in _list(seen.get("$orderby"), limits.sta_orderby_max, "$orderby"):
            words = part.split()
            if not 1 <= len(words) <= 2 or words[0] not in schema or (
                    len(words) == 2 and words[1] not in ("asc", "desc")):
                raise QueryError("$orderby takes PROPERTY [asc|desc], a property of %s"
                                 % ", ".join(sorted(schema)))
            orderby.append((words[0], len(words) == 2 and words[1] == "desc"))
        nav = NAVIGATION[entity_set]
        expand = tuple(_list(seen.get("$expand"), len(nav), "$expand"))
        if any(name not in nav for name in expand):
            raise QueryError("$expand takes navigation properties of %s: %s (one level)"
                             % (entity_set, ", ".join(nav)))
        allowed = ("@iot.id", "id", *FIELDS[entity_set], *nav)
        select_ = tuple(_list(seen.get("$select"), len(allowed), "$select"))
        if any(name not in allowed for name in select_):
            raise QueryError("$select takes properties of %s: %s"
                             % (entity_set, ", ".join(allowed)))
        count = seen.get("$count", "false")
        if count not in ("true", "false"):
            raise QueryError("$count is true or false")
        after = None
        if "$skiptoken" in seen:
            m = _SKIPTOKEN.match(seen["$skiptoken"])
            mark = float(m.group(1)) if m and m.group(1) else 0.0
            if (entity_set != "Observations" or m is None or not math.isfinite(mark)
                    or len(orderby) > 1 or any(p not in KEYSET for p, _ in orderby)):
                raise QueryError("$skiptoken is only the one an @iot.nextLink gave")
            after = (mark, int(m.group(2)))
        return cls(node, top, skip, tuple(orderby), expand, select_, count == "true",
                   after)


def _count_option(name: str, text: str | None, default: int, most: int) -> int:
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise QueryError("%s is a non-negative integer" % name)
    value = int(text)
    if value > most:
        raise QueryError("%s is at most %d" % (name, most))
    return value


def _list(text: str | None, most: int, name: str) -> list[str]:
    if text is None:
        return []
    parts = [p.strip() for p in text.split(",")]
    if not all(parts) or len(parts) > most:
        raise QueryError("%s is a list of at most %d names" % (name, most))
    return parts


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def id_literal(value: str | int) -> str:
    return str(value) if isinstance(value, int) else "'%s'" % value


class Entities:
    """Bodies of entities (without links) and the relations between them."""

    def __init__(self, cat: Catalogue, settings: Settings, ids: PublicIds,
                 session: Session) -> None:
        self.cat = cat
        self.settings = settings
        self.ids = ids
        self.session = session

    # ----------------------------------------------------------------- bodies

    def body(self, entity_set: str, key: Any) -> dict[str, Any]:
        cat = self.cat
        if entity_set == "Things":
            th = cat.things[key]
            kinds = sorted(s.kind for s in cat.by_thing.get(th.id, ()))
            loc = cat.locations.get(th.location_id)
            return {"@iot.id": th.id, "name": "%s at %s" % (th.model, loc.name if loc
                                                             else "a public site"),
                    "description": "a cityedge gateway measuring %s" % (", ".join(kinds)
                                                                      or "nothing yet"),
                    "properties": {"model": th.model, "hardwareClass": th.hardware_class}}
        if entity_set == "Locations":
            lo = cat.locations[key]
            return {"@iot.id": lo.id, "name": lo.name, "description": lo.description,
                    "encodingType": "application/geo+json",
                    "location": {"type": "Point", "coordinates": [lo.longitude,
                                                                  lo.latitude]}}
        if entity_set == "Sensors":
            se = cat.sensors[key]
            return {"@iot.id": se.id, "name": se.model,
                    "description": "cityedge hardware model %s" % se.model,
                    "encodingType": "text/plain", "metadata": se.hardware_class}
        if entity_set == "ObservedProperties":
            kind = cat.kinds[key]
            return {"@iot.id": key, "name": kind.name, "definition": kind.definition,
                    "description": kind.description}
        if entity_set == "Datastreams":
            ds = cat.datastreams[key]
            kind = cat.kinds[ds.kind]
            return {"@iot.id": ds.id, "name": "%s of %s" % (kind.name, ds.thing.id[:8]),
                    "description": "%s, verified readings" % kind.name,
                    "unitOfMeasurement": {"name": kind.unit_name, "symbol": kind.unit_symbol,
                                          "definition": kind.unit_definition},
                    "observationType": MEASUREMENT}
        raise KeyError(entity_set)

    def table(self, entity_set: str) -> Mapping[str, Any]:
        cat = self.cat
        tables: dict[str, Mapping[str, Any]] = {
            "Things": cat.things, "Locations": cat.locations, "Sensors": cat.sensors,
            "ObservedProperties": cat.kinds, "Datastreams": cat.datastreams}
        return tables[entity_set]

    def keys(self, entity_set: str) -> list[Any]:
        return list(self.table(entity_set))

    def exists(self, entity_set: str, key: Any) -> bool:
        if entity_set == "Observations":
            return isinstance(key, int) and bool(self.observations(
                None, col(Reading.id) == key, None, (), 0, 1)[0])
        return isinstance(key, str) and key in self.table(entity_set)

    def related(self, entity_set: str, key: Any, nav: str) -> list[Any]:
        """Keys of the entities ``nav`` leads to (not for Observations of a stream)."""
        cat = self.cat
        if entity_set == "Things":
            th = cat.things[key]
            if nav == "Locations":
                return [th.location_id] if th.location_id in cat.locations else []
            return [s.id for s in cat.by_thing.get(th.id, ())]
        if entity_set == "Locations":
            return [t.id for t in cat.things.values() if t.location_id == key]
        if entity_set == "Sensors":
            return [s.id for s in cat.datastreams.values() if s.thing.sensor_id == key]
        if entity_set == "ObservedProperties":
            return [s.id for s in cat.datastreams.values() if s.kind == key]
        if entity_set == "Datastreams":
            ds = cat.datastreams[key]
            return [{"Thing": ds.thing.id, "Sensor": ds.thing.sensor_id,
                     "ObservedProperty": ds.kind}[nav]]
        if entity_set == "Observations":
            row = self.session.get(Reading, key)
            stream = self.stream_of(row) if row is not None else None
            return [stream.id] if stream is not None else []
        raise KeyError(entity_set)

    def stream_of(self, row: Reading) -> DatastreamEntry | None:
        kind = kind_of(row.device_id, row.name, self.cat.kinds)
        return None if kind is None else self.cat.by_stream.get((row.device_id, kind))

    # ----------------------------------------------------------- observations

    def observation(self, row: Reading) -> dict[str, Any]:
        stream = self.stream_of(row)
        thing = stream.thing.id if stream is not None else ""
        when = iso(row.t)
        relay = self.cat.by_device.get(row.via) if row.via else None
        return {"@iot.id": row.id, "phenomenonTime": when, "resultTime": when,
                "result": row.value,
                "parameters": {"batch": "%s/%d" % (thing, row.batch_seq),
                               "batchSeq": row.batch_seq, "chainStatus": row.status,
                               "signature": SIGNATURE,
                               "relayed": row.via is not None,
                               "relayedBy": relay.id if relay is not None else None}}

    def observations(self, streams: list[DatastreamEntry] | None,
                     extra: ColumnElement[bool] | None, node: sta_filter.Node | None,
                     orderby: Sequence[tuple[str, bool]], skip: int, top: int,
                     count: bool = False, after: tuple[float, int] | None = None
                     ) -> tuple[list[Reading], int | None]:
        """Published readings of ``streams`` (None: of every public datastream)."""
        settings = self.settings
        if streams is None:
            where = [col(Reading.device_id).in_(public_devices(settings)),
                     *published(settings)]
        elif not streams:
            return [], 0 if count else None
        else:
            where = [or_(*[stream_condition(s, settings) for s in streams])]
        if extra is not None:
            where.append(extra)
        if node is not None:
            where.append(to_sql(node))
        order = [(_COLUMNS[p]).desc() if desc else _COLUMNS[p] for p, desc in orderby]
        query = select(Reading).where(*where)
        if after is not None:
            query = query.where(after_condition(orderby, after))
        query = query.order_by(*order, col(Reading.id))
        rows = list(self.session.exec(query.offset(skip).limit(top)).all())
        if streams is None:  # a hostile name matching another device's prefix: not shown
            rows = [r for r in rows if self.stream_of(r) is not None]
        total = None
        if count:
            total = self.session.exec(select(func.count()).select_from(Reading)
                                      .where(*where)).one()
        return rows, total


def after_condition(orderby: Sequence[tuple[str, bool]], after: tuple[float, int]
                    ) -> ColumnElement[bool]:
    """Rows after (value, id) in the order ``orderby`` then id ascending; the bound on
    the sort column alone comes first so an index on it is used."""
    value, last_id = after
    rid = col(Reading.id)
    if not orderby or orderby[0][0] in ("@iot.id", "id"):
        desc = bool(orderby) and orderby[0][1]
        return rid < last_id if desc else rid > last_id
    column = _COLUMNS[orderby[0][0]]
    if orderby[0][1]:
        return and_(column <= value, or_(column < value, rid > last_id))
    return and_(column >= value, or_(column > value, rid > last_id))


def skiptoken(orderby: Sequence[tuple[str, bool]], row: Reading) -> str:
    """The ``$skiptoken`` of the page after ``row``."""
    if not orderby or orderby[0][0] in ("@iot.id", "id"):
        return "_%d" % (row.id or 0)
    value = row.value if orderby[0][0] == "result" else row.t
    return "%r_%d" % (value, row.id or 0)


_COLUMNS: dict[str, Any] = {"@iot.id": col(Reading.id), "id": col(Reading.id),
                            "phenomenonTime": col(Reading.t), "resultTime": col(Reading.t),
                            "result": col(Reading.value)}


def to_sql(node: sta_filter.Node) -> ColumnElement[bool]:
    """The filter over the ``reading`` columns; literals are bound parameters."""
    if isinstance(node, sta_filter.BoolOp):
        parts = (to_sql(node.left), to_sql(node.right))
        return and_(*parts) if node.op == "and" else or_(*parts)
    if isinstance(node, sta_filter.Not):
        return not_(to_sql(node.arg))
    value = node.value
    if isinstance(value, dt.datetime):
        value = value.timestamp()
    result: ColumnElement[bool] = sta_filter.compare(_COLUMNS[node.prop], node.op, value)
    return result


def props_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The filterable properties of an in-memory entity's body."""
    return {"@iot.id": body.get("@iot.id"), "id": body.get("@iot.id"),
            "name": body.get("name"), "description": body.get("description")}


def order_key(prop: str) -> Callable[[Mapping[str, Any]], Any]:
    def key(body: Mapping[str, Any]) -> Any:
        value = props_of(body).get(prop)
        return (value is None, value if value is not None else "")
    return key
