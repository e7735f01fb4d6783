"""The public, read-only open-data endpoints: OGC SensorThings API v1.1 under
``/sta/v1.1`` and bulk downloads per site and day under ``/opendata/v1``.

No token: anyone may read. Every request passes, in order: open data enabled (404
otherwise), the client's rate limit (``sta_burst``/``sta_per_s`` per address: 429), the
query string's length (414), then the query options' rules (``query.Options``: 400, never
echoing the input). Answers carry a strong ``ETag`` (SHA-256 of the body) and
``Cache-Control: public, max-age=sta_cache_s``; ``If-None-Match`` with that tag gets 304.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from psycopg.errors import QueryCanceled
from sqlalchemy import text as sa_text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from cityedge_core import senml
from cityedge_core.errors import PeerError
from cityedge_fleet.auth import client_address
from cityedge_fleet.instruments import OPENDATA_TIMEOUTS
from cityedge_fleet.models import Device, Reading
from cityedge_fleet.opendata import sta_filter
from cityedge_fleet.opendata.catalogue import OpenData, public_devices, published
from cityedge_fleet.opendata.query import (
    NAVIGATION,
    Entities,
    Options,
    QueryError,
    id_literal,
    iso,
    order_key,
    props_of,
    skiptoken,
)

STA_PREFIX = "/sta/v1.1"
BULK_PREFIX = "/opendata/v1"
# not in the fleet's OpenAPI document: the SensorThings API is its own standard (its
# service document is ``/sta/v1.1``), and these public routes take no token
router = APIRouter(prefix=STA_PREFIX, tags=["open data"], include_in_schema=False)
bulk_router = APIRouter(prefix=BULK_PREFIX, tags=["open data"], include_in_schema=False)
ENTITY_SETS = tuple(NAVIGATION)
_SEGMENT = re.compile(r"^(?P<set>[A-Za-z]{1,32})"
                      r"(?:\((?:'(?P<text>[0-9A-Za-z_.-]{1,64})'|(?P<num>[0-9]{1,18}))\))?$")
_DAY_FILE = re.compile(r"^(?P<day>\d{4}-\d{2}-\d{2})\.(?P<fmt>csv|senml\.json)$")
IF_NONE_MATCH_MAX = 16  # entity tags looked at in one If-None-Match
CONFORMANCE = ["http://www.opengis.net/spec/iot_sensing/1.1/req/datamodel",
               "http://www.opengis.net/spec/iot_sensing/1.1/req/resource-path/resource-path-to-entities",
               "http://www.opengis.net/spec/iot_sensing/1.1/req/request-data"]
CSV_COLUMNS = ("datastream_id", "thing_id", "observed_property", "unit", "phenomenon_time",
               "result", "batch", "chain_status", "signature")


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"code": status, "type": "error", "message": message},
                        status_code=status, headers=headers)


def _admit(request: Request) -> OpenData:
    od: OpenData | None = getattr(request.app.state, "opendata", None)
    if od is None:
        raise Refused(404, "open data is not enabled on this fleet")
    if not od.limiter.take(client_address(request)):
        raise Refused(429, "too many requests: slow down", {"Retry-After": "1"})
    if len(request.url.query) > od.settings.limits.sta_query_max_chars:
        raise Refused(414, "the query string has more than %d characters"
                      % od.settings.limits.sta_query_max_chars)
    return od


def _respond(request: Request, od: OpenData, body: bytes, media_type: str,
             extra: dict[str, str] | None = None) -> Response:
    etag = '"%s"' % hashlib.sha256(body).hexdigest()[:40]
    headers = {"ETag": etag, "Cache-Control": "public, max-age=%d"
               % od.settings.limits.sta_cache_s, **(extra or {})}
    wanted = request.headers.get("if-none-match", "")
    tags = [t.strip().removeprefix("W/") for t in wanted.split(",")[:IF_NONE_MATCH_MAX]]
    if any(hmac.compare_digest(t.encode(), etag.encode()) for t in tags):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + STA_PREFIX


@router.get("")
@router.get("/")
def sta_root(request: Request) -> Response:
    """The service document: the entity sets and the conformance classes."""
    try:
        od = _admit(request)
    except Refused as e:
        return _error(e.status, str(e), e.headers)
    base = _base(request)
    data = {"value": [{"name": name, "url": "%s/%s" % (base, name)} for name in ENTITY_SETS],
            "serverSettings": {"conformance": CONFORMANCE}}
    return _respond(request, od, _json(data), "application/json")


@contextmanager
def _public_session(od: OpenData) -> Iterator[Session]:
    """A session for one public request: on PostgreSQL each of its queries may run
    ``sta_statement_timeout_ms`` (``SET LOCAL``: this transaction only); one stopped
    there is refused (400: the client narrows its query) and counted. SQLite (one
    machine, the embedded default) has no such limit."""
    with Session(od.engine) as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(sa_text("SET LOCAL statement_timeout = %d"
                                    % od.settings.limits.sta_statement_timeout_ms))
        try:
            yield session
        except OperationalError as e:
            if not isinstance(e.orig, QueryCanceled):
                raise
            OPENDATA_TIMEOUTS.inc()
            raise Refused(400, "the query ran over %d ms and was stopped: narrow it (a "
                          "Datastream's Observations, $orderby=phenomenonTime with a time "
                          "window, a smaller window)"
                          % od.settings.limits.sta_statement_timeout_ms) from None


@router.get("/{path:path}")
def sta_resource(path: str, request: Request) -> Response:
    """An entity set, an entity, or an entity's navigation property (one level)."""
    try:
        od = _admit(request)
        cat = od.catalogue()
        with _public_session(od) as session:
            ent = Entities(cat, od.settings, od.ids, session)
            data = _resource(ent, od, path, request)
    except Refused as e:
        return _error(e.status, str(e), e.headers)
    except PeerError as e:  # FilterError, QueryError: the client's options
        return _error(400, str(e))
    return _respond(request, od, _json(data), "application/json")


def _segment(text: str) -> tuple[str, str | int | None]:
    m = _SEGMENT.match(text)
    if m is None:
        raise Refused(404, "no such resource")
    key: str | int | None = m.group("text") if m.group("text") is not None else (
        int(m.group("num")) if m.group("num") is not None else None)
    return m.group("set"), key


def _resource(ent: Entities, od: OpenData, path: str, request: Request) -> dict[str, Any]:
    parts = path.strip("/").split("/")
    if not 1 <= len(parts) <= 2:
        raise Refused(404, "no such resource (one navigation level)")
    entity_set, key = _segment(parts[0])
    if entity_set not in ENTITY_SETS:
        raise Refused(404, "no such entity set; one of %s" % ", ".join(ENTITY_SETS))
    nav = parts[1] if len(parts) == 2 else None
    if nav is not None and (key is None or nav not in NAVIGATION[entity_set]):
        raise Refused(404, "no such navigation property")
    if key is not None and not ent.exists(entity_set, key):
        raise Refused(404, "no such entity")
    base = _base(request)
    params = list(request.query_params.multi_items())
    if nav is None and key is not None:
        opts = Options.parse(entity_set, [p for p in params
                                          if p[0] in ("$expand", "$select")],
                             od.settings.limits)
        if len(params) != sum(1 for p in params if p[0] in ("$expand", "$select")):
            raise QueryError("an entity takes only $expand and $select")
        return _render(ent, od, entity_set, _body(ent, entity_set, key), opts, base)
    target = entity_set
    if nav is not None:
        target, one = NAVIGATION[entity_set][nav]
        if one:
            opts = Options.parse(target, [p for p in params
                                          if p[0] in ("$expand", "$select")],
                                 od.settings.limits)
            related = ent.related(entity_set, key, nav)
            if not related:
                raise Refused(404, "no such entity")
            return _render(ent, od, target, _body(ent, target, related[0]), opts, base)
    opts = Options.parse(target, params, od.settings.limits)
    return _collection(ent, od, entity_set, key, nav, target, opts, base, request)


def _body(ent: Entities, entity_set: str, key: Any) -> dict[str, Any]:
    if entity_set == "Observations":
        row = ent.session.get(Reading, key)
        assert row is not None  # exists() checked it is published
        return ent.observation(row)
    return ent.body(entity_set, key)


def _collection(ent: Entities, od: OpenData, entity_set: str, key: Any, nav: str | None,
                target: str, opts: Options, base: str, request: Request) -> dict[str, Any]:
    token = ""
    if target == "Observations":
        streams = None if nav is None else [ent.cat.datastreams[key]]
        rows, total = ent.observations(streams, None, opts.filter, opts.orderby, opts.skip,
                                       opts.top + 1, opts.count, opts.after)
        more = len(rows) > opts.top
        page = [ent.observation(r) for r in rows[:opts.top]]
        if more and opts.keyset() and opts.top > 0:
            token = skiptoken(opts.orderby, rows[opts.top - 1])
    else:
        keys = ent.keys(target) if nav is None else ent.related(entity_set, key, nav)
        bodies = [ent.body(target, k) for k in keys]
        if opts.filter is not None:
            bodies = [b for b in bodies if sta_filter.matches(opts.filter, props_of(b))]
        bodies.sort(key=order_key("@iot.id"))
        for prop, desc in reversed(opts.orderby):
            bodies.sort(key=order_key(prop), reverse=desc)
        total = len(bodies)
        page = bodies[opts.skip:opts.skip + opts.top]
        more = opts.skip + opts.top < total
    out: dict[str, Any] = {}
    if opts.count:
        out["@iot.count"] = total
    out["value"] = [_render(ent, od, target, b, opts, base) for b in page]
    if more:
        params = [(k, v) for k, v in request.query_params.multi_items()
                  if k not in ("$skip", "$skiptoken")]
        if target == "Observations" and opts.keyset() and opts.top > 0:
            params.append(("$skiptoken", token))
        else:
            params.append(("$skip", str(opts.skip + opts.top)))
        if "$top" not in dict(params):
            params.append(("$top", str(opts.top)))
        out["@iot.nextLink"] = "%s/%s?%s" % (base, request.path_params["path"].strip("/"),
                                             urlencode(params, safe="$'(),:", quote_via=quote))
    return out


def _render(ent: Entities, od: OpenData, entity_set: str, body: dict[str, Any],
            opts: Options, base: str) -> dict[str, Any]:
    key = body["@iot.id"]
    self_link = "%s/%s(%s)" % (base, entity_set, id_literal(key))
    out: dict[str, Any] = {"@iot.id": key, "@iot.selfLink": self_link}
    out.update((k, v) for k, v in body.items() if k != "@iot.id")
    for nav in NAVIGATION[entity_set]:
        out["%s@iot.navigationLink" % nav] = "%s/%s" % (self_link, nav)
    most = od.settings.limits.sta_expand_max
    plain = Options(None, most, 0, (), (), (), False)
    for nav in opts.expand:
        target, one = NAVIGATION[entity_set][nav]
        if target == "Observations":
            stream = ent.cat.datastreams[key]
            rows, _ = ent.observations([stream], None, None, (), 0, most + 1)
            bodies = [ent.observation(r) for r in rows]
        else:
            bodies = [ent.body(target, k) for k in ent.related(entity_set, key, nav)]
            bodies.sort(key=order_key("@iot.id"))
        rendered = [_render(ent, od, target, b, plain, base) for b in bodies[:most]]
        if one:
            out[nav] = rendered[0] if rendered else None
        else:
            out[nav] = rendered
            if len(bodies) > most:
                out["%s@iot.nextLink" % nav] = "%s/%s?$skip=%d" % (self_link, nav, most)
    if opts.select:
        keep = {"@iot.id" if s == "id" else s for s in opts.select}
        keep |= {"%s@iot.navigationLink" % s for s in opts.select}
        keep |= {"%s@iot.nextLink" % s for s in opts.select}
        keep |= set(opts.expand)
        out = {k: v for k, v in out.items() if k in keep}
    return out


# -------------------------------------------------------------------- bulk downloads


@bulk_router.get("/locations/{location_id}/{day_file}")
def bulk_download(location_id: str, day_file: str, request: Request) -> Response:
    """Every published reading at one public site (a Location) on one UTC day, as CSV
    (with provenance columns) or SenML JSON (RFC 8428): ``<YYYY-MM-DD>.csv`` or
    ``<YYYY-MM-DD>.senml.json``."""
    try:
        od = _admit(request)
        cat = od.catalogue()
        loc = cat.locations.get(location_id)
        m = _DAY_FILE.match(day_file)
        if loc is None or m is None:
            raise Refused(404, "no such download: /opendata/v1/locations/<Location id>/"
                          "<YYYY-MM-DD>.csv or .senml.json")
        try:
            day = dt.datetime.strptime(m.group("day"), "%Y-%m-%d").replace(tzinfo=dt.UTC)
        except ValueError:
            raise Refused(404, "not a valid day") from None
        start = day.timestamp()
        most = od.settings.limits.sta_bulk_max_rows
        with _public_session(od) as session:
            rows = session.exec(
                select(Reading).where(
                    col(Reading.device_id).in_(public_devices(od.settings).where(
                        Device.site == loc.site)),
                    *published(od.settings), col(Reading.t) >= start,
                    col(Reading.t) < start + 86400)
                .order_by(col(Reading.t), col(Reading.id)).limit(most + 1)).all()
            if len(rows) > most:
                raise Refused(413, "more than %d readings on that day: page through "
                              "the SensorThings API instead" % most)
            ent = Entities(cat, od.settings, od.ids, session)
            streams = [(r, ent.stream_of(r)) for r in rows]
    except Refused as e:
        return _error(e.status, str(e), e.headers)
    name = "%s-%s" % (location_id[:12], m.group("day"))
    if m.group("fmt") == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row, stream in streams:
            if stream is None:
                continue
            kind = cat.kinds[stream.kind]
            writer.writerow((stream.id, stream.thing.id, stream.kind, kind.unit_symbol,
                             iso(row.t), repr(row.value), "%s/%d" % (stream.thing.id,
                                                                     row.batch_seq),
                             row.status, "verified"))
        return _respond(request, od, buf.getvalue().encode(), "text/csv; charset=utf-8",
                        {"Content-Disposition": 'attachment; filename="%s.csv"' % name})
    pack = [senml.to_json_names({senml.N: "%s:%s" % (stream.thing.id, stream.kind),
                                 senml.U: cat.kinds[stream.kind].unit_symbol,
                                 senml.V: row.value, senml.T: row.t})
            for row, stream in streams if stream is not None]
    return _respond(request, od, _json(pack), "application/senml+json",
                    {"Content-Disposition": 'attachment; filename="%s.senml.json"' % name})
