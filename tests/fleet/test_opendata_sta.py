"""Open data for real: devices enrolled through the API sign batches that the real ingest
verifies and stores; a real uvicorn serves the SensorThings API; the FROST project's own
Python client (``frost-sta-client``, an independent implementation) reads Things,
Datastreams and Observations with filters and paging, and the values are exactly the
verified readings. Forged, forked, boot-time and private readings never appear, and no
answer anywhere in the API carries a device id, a serial, a certificate serial or the
exact position of a site."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import frost_sta_client as fsc
import httpx
import pytest
from fastapi.testclient import TestClient
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message
from sqlmodel import Session, select

from cityedge_core import batch as batchmod
from cityedge_core import senml
from cityedge_fleet.app import create_app
from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import Credential, Device, Role
from cityedge_fleet.opendata.catalogue import OpenDataError

from support.fleet import Api, EnrolledDevice, enroll_device, relay_topic
from support.opendata import (
    LATITUDE,
    LONGITUDE,
    PRIVATE_SITE,
    crawl,
    opendata_settings,
    served,
)

T0 = 1_790_000_000.0  # 2026-09-21T...Z
STA = "/sta/v1.1"
# the rate limit is tested on its own: here it never decides an answer
UNLIMITED = FleetLimits(quarantine_after_forgeries=3, sta_burst=1_000_000)


def pack(device: str, values: list[tuple[str, float, float]], prefixed: bool) -> list[Any]:
    """SenML records (name, seconds after T0, value); names prefixed ``<device>:`` (bn)
    or plain."""
    recs: list[dict[int, Any]] = []
    for i, (name, dt_s, value) in enumerate(values):
        rec: dict[int, Any] = {senml.N: name, senml.T: dt_s, senml.V: value}
        if i == 0:
            rec[senml.BT] = T0
            if prefixed:
                rec[senml.BN] = device + ":"
        recs.append(rec)
    return recs


def forged(dev: EnrolledDevice, seq: int, records: list[Any]) -> bytes:
    """A batch in ``dev``'s name with its kid, signed by another key."""
    payload = batchmod.Batch(dev.id, seq, bytes(32), 1, records).encode()
    msg = Sign1Message(phdr={Algorithm: Es256, KID: dev.signer.kid}, payload=payload)
    msg.key = EC2Key.generate_key(crv=P256)
    return bytes(msg.encode())


@dataclass
class World:
    api: Api
    settings: Settings
    devices: dict[str, EnrolledDevice]
    expected: dict[tuple[str, str], list[tuple[float, float]]]  # (device, kind) -> (t, v)
    statuses: list[str]


def make_world(api: Api, settings: Settings) -> World:
    a, b, c, d, gw = (enroll_device(api, i) for i in (1, 2, 3, 4, 5))
    node = enroll_device(api, 6, gateway=gw.id)  # reports through the gateway gw
    r = api.client.patch("/devices/%s" % c.id, json={"site": PRIVATE_SITE},
                         headers=api.headers(Role.technician))
    assert r.status_code == 200, r.text
    ingest = Ingestor(api.engine, settings)
    statuses = []

    def send(dev: EnrolledDevice, payload: bytes) -> None:
        statuses.append(ingest.handle(dev.topic, payload).status)

    a1 = a.writer.sign(pack(a.id, [("pm25", 0, 10.5), ("temp", 1, 20.25),
                                   ("pm25", 60, 11.0), ("noise", 60, 40.0)], True), boot=1)
    send(a, a1)
    send(a, a.writer.sign(pack(a.id, [("pm25", 120 + 60 * i, 12.0 + i) for i in range(7)],
                                True), boot=1))
    send(b, b.writer.sign(pack(b.id, [("pm25", 0, 5.0), ("pm25", 60, 6.0)], False), boot=1))
    send(c, c.writer.sign(pack(c.id, [("pm25", 0, 99.0)], True), boot=1))  # private site
    send(a, forged(a, 3, pack(a.id, [("pm25", 900, 666.0)], True)))  # bad signature
    send(a, a1)  # the same bytes again: a duplicate, stored once
    send(b, b.writer.sign(pack(b.id, [("pm25", 5, 888.0)], False), boot=1,
                          timebase=batchmod.TIME_SINCE_BOOT))  # seconds since boot: no time
    a.writer.head = bytes(32)  # the chain broken: a fork, stored but not published
    send(a, a.writer.sign(pack(a.id, [("pm25", 960, 777.0)], True), boot=1))
    # the node's own signed batch, relayed byte for byte by its gateway
    statuses.append(ingest.handle(relay_topic(gw.id), node.writer.sign(
        pack(node.id, [("temp", 30, -3.5)], True), boot=1)).status)
    assert statuses == ["ok", "ok", "ok", "ok", "bad_signature", "duplicate", "ok", "fork",
                        "ok"]
    expected = {
        (a.id, "pm25"): [(T0, 10.5), (T0 + 60, 11.0)] + [(T0 + 120 + 60 * i, 12.0 + i)
                                                         for i in range(7)],
        (a.id, "temp"): [(T0 + 1, 20.25)],
        (b.id, "pm25"): [(T0, 5.0), (T0 + 60, 6.0)],
        (node.id, "temp"): [(T0 + 30, -3.5)],
    }
    return World(api, settings, {"a": a, "b": b, "c": c, "d": d, "gw": gw, "node": node},
                 expected, statuses)


@pytest.fixture
def world(settings: Settings, tmp_path: Path) -> Iterator[World]:
    od = opendata_settings(settings, tmp_path, limits=UNLIMITED)
    app = create_app(od, init_db=True)
    with TestClient(app) as client:
        api = Api(client, od)
        yield make_world(api, od)
    app.state.engine.dispose()


def iso_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_frost_client_reads_the_verified_readings_with_filters_and_paging(
        world: World) -> None:
    app = world.api.client.app
    a, b = world.devices["a"], world.devices["b"]
    with served(app) as base:  # type: ignore[arg-type]
        service = fsc.SensorThingsService(base + STA)
        things = list(service.things().query().top(1).list())  # pages of one
        # the five devices enrolled at the public site (two have sent nothing themselves)
        assert len(things) == 5 and len({t.id for t in things}) == 5
        streams = list(service.datastreams().query().list())
        assert len(streams) == 4
        got: dict[tuple[str, str], list[tuple[float, float]]] = {}
        by_thing: dict[str, str] = {}
        kind_of: dict[str, str] = {}
        relayed: list[str] = []
        for thing in things:
            for ds in thing.get_datastreams().query().list():
                by_thing[ds.id] = thing.id
        assert sorted(by_thing) == sorted(s.id for s in streams)
        for ds in streams:
            full = service.datastreams().find(ds.id)
            prop = full.observed_property if full.observed_property else None
            kind = json.loads(httpx.get("%s%s/Datastreams('%s')/ObservedProperty"
                                        % (base, STA, ds.id)).text)["@iot.id"]
            assert prop is None or prop.id == kind
            kind_of[ds.id] = kind
            obs = list(ds.get_observations().query().top(2).orderby(
                "phenomenonTime", "asc").list())  # pages of two, followed by the client
            got[(by_thing[ds.id], kind)] = [(iso_time(o.phenomenon_time), o.result)
                                            for o in obs]
            for o in obs:
                assert o.parameters["signature"].startswith("ES256")
                assert o.parameters["chainStatus"] == "ok"
                if o.parameters["relayed"]:
                    relayed.append(o.parameters["relayedBy"])
        # the things' public ids stand for a and b: match them by their readings
        want = {}
        names = {}
        for (device, kind), values in world.expected.items():
            names[device] = names.get(device) or next(
                tid for (tid, k), vals in got.items() if k == kind and vals == values)
            want[(names[device], kind)] = values
        assert got == want
        assert names[a.id] != names[b.id]
        # the relayed reading names its gateway by the gateway's public Thing id
        gw_thing = app.state.opendata.ids.thing(world.devices["gw"].id)  # type: ignore[attr-defined]
        assert relayed == [gw_thing] and gw_thing in {t.id for t in things}

        # $filter over time and value, $count, $orderby desc
        pm25_a = next(s.id for s in streams
                      if (by_thing[s.id], kind_of[s.id]) == (names[a.id], "pm25"))
        since = dt.datetime.fromtimestamp(T0 + 120, dt.UTC).isoformat().replace(
            "+00:00", "Z")
        query = (service.observations().query()
                 .filter("phenomenonTime ge %s and (result gt 13 or result eq 10.5)"
                         % since).orderby("result", "desc").count())
        query.parent = service.datastreams().find(pm25_a)
        values = [o.result for o in query.list()]
        assert values == [18.0, 17.0, 16.0, 15.0, 14.0]
        r = httpx.get(base + STA + "/Datastreams('%s')/Observations" % pm25_a,
                      params={"$filter": "result le 11", "$count": "true", "$top": "1"})
        assert r.status_code == 200
        page = r.json()
        assert page["@iot.count"] == 2 and len(page["value"]) == 1
        assert "$skiptoken=_" in page["@iot.nextLink"]  # after the last row, by the index
        # a forged, forked or boot-time value is nowhere, in any stream
        everything = list(service.observations().query().list())
        assert sorted(o.result for o in everything) == sorted(
            v for values in world.expected.values() for _, v in values)
        assert not {666.0, 777.0, 888.0, 99.0, 40.0} & {o.result for o in everything}


def _get(client: TestClient) -> Any:
    def get(url: str) -> tuple[int, bytes, Any]:
        r = client.get(url)
        data = r.json() if r.headers.get("content-type", "").startswith(
            "application/json") else None
        return r.status_code, r.content, data
    return get


def private_strings(world: World) -> list[str]:
    """Everything the security team keeps private: device ids (and their MAC part),
    serials, certificate serials and kids, the exact position."""
    out = ["%.7f" % LATITUDE, "%.7f" % LONGITUDE, repr(LATITUDE), repr(LONGITUDE),
           "%.4f" % LATITUDE, "%.4f" % LONGITUDE, PRIVATE_SITE]
    with Session(world.api.engine) as session:
        for dev in session.exec(select(Device)).all():
            out += [dev.id, dev.id.rsplit(":", 1)[-1], dev.serial]
        for cred in session.exec(select(Credential)).all():
            out += [cred.serial, cred.serial.upper(), str(int(cred.serial, 16)), cred.kid,
                    cred.public_key]
    return out


def test_no_open_data_answer_carries_a_device_id_serial_or_exact_location(
        world: World) -> None:
    client = world.api.client
    pages = crawl(_get(client), "http://testserver" + STA + "/")
    assert len(pages) > 30  # every entity, link and expansion was visited
    kinds = {k for k in ("Things", "Locations", "Sensors", "ObservedProperties",
                         "Datastreams", "Observations")
             if any("/%s(" % k in url for url in pages)}
    assert len(kinds) == 6
    loc = next(page for url, page in pages.items() if url.endswith("/Locations"))
    point = json.loads(loc)["value"][0]["location"]["coordinates"]
    assert point == [round(LONGITUDE, 3), round(LATITUDE, 3)]
    lid = json.loads(loc)["value"][0]["@iot.id"]
    day = dt.datetime.fromtimestamp(T0, dt.UTC).strftime("%Y-%m-%d")
    for fmt in ("csv", "senml.json"):
        r = client.get("/opendata/v1/locations/%s/%s.%s" % (lid, day, fmt))
        assert r.status_code == 200
        pages[r.url.path] = r.content
    private = private_strings(world)
    for url, body in pages.items():
        text = body.decode()
        for secret in private:
            assert secret not in text, (url, secret)


def test_bulk_downloads_hold_the_days_verified_readings(world: World) -> None:
    client = world.api.client
    lid = client.get(STA + "/Locations").json()["value"][0]["@iot.id"]
    day = dt.datetime.fromtimestamp(T0, dt.UTC).strftime("%Y-%m-%d")
    csv_text = client.get("/opendata/v1/locations/%s/%s.csv" % (lid, day)).text
    lines = csv_text.strip().split("\n")
    assert lines[0].split(",")[:6] == ["datastream_id", "thing_id", "observed_property",
                                       "unit", "phenomenon_time", "result"]
    want = sorted(v for values in world.expected.values() for _, v in values)
    assert sorted(float(ln.split(",")[5]) for ln in lines[1:]) == want
    assert all(ln.split(",")[7] == "ok" and ln.endswith(",verified") for ln in lines[1:])
    r = client.get("/opendata/v1/locations/%s/%s.senml.json" % (lid, day))
    assert r.headers["content-type"] == "application/senml+json"
    records = [senml.from_json_names(rec) for rec in r.json()]
    senml.validate_pack(records)  # the project's own SenML rules accept it
    assert sorted(rec[senml.V] for rec in records) == want
    assert {rec[senml.U] for rec in records} == {"ug/m3", "Cel"}
    other = (dt.datetime.fromtimestamp(T0, dt.UTC) + dt.timedelta(days=3)).strftime(
        "%Y-%m-%d")
    assert client.get("/opendata/v1/locations/%s/%s.csv" % (lid, other)).text.count(
        "\n") == 1  # the header alone
    assert client.get("/opendata/v1/locations/%s/%s.csv" % ("0" * 32, day)
                      ).status_code == 404


def test_answers_carry_an_etag_and_if_none_match_gets_304(world: World) -> None:
    client = world.api.client
    r = client.get(STA + "/Observations", params={"$top": "3"})
    assert r.status_code == 200
    etag = r.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{40}"', etag)
    assert r.headers["cache-control"] == "public, max-age=60"
    again = client.get(STA + "/Observations", params={"$top": "3"},
                       headers={"If-None-Match": 'W/"x", ' + etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    other = client.get(STA + "/Observations", params={"$top": "4"},
                       headers={"If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag


def test_a_client_over_its_rate_is_refused_with_429(settings: Settings,
                                                    tmp_path: Path) -> None:
    od = opendata_settings(settings, tmp_path).model_copy(update={"limits": FleetLimits(
        sta_burst=5, sta_per_s=0.001)})
    app = create_app(od, init_db=True)
    with TestClient(app) as client:
        codes = [client.get(STA + "/Things").status_code for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        assert client.get("/health").status_code == 200  # the rest of the API is not
    app.state.engine.dispose()


def test_open_data_is_off_without_a_secret_and_refuses_an_unsafe_one(
        settings: Settings, tmp_path: Path) -> None:
    app = create_app(settings, init_db=True)  # no opendata_secret_file: no default secret
    with TestClient(app) as client:
        assert client.get(STA + "/Things").status_code == 404
    app.state.engine.dispose()
    loose = tmp_path / "loose.secret"
    loose.write_bytes(b"k" * 32)
    loose.chmod(0o644)
    with pytest.raises(OpenDataError, match="open to other users"):
        create_app(settings.model_copy(update={"opendata_secret_file": loose}))
    short = tmp_path / "short.secret"
    short.write_bytes(b"k" * 16)
    short.chmod(0o600)
    with pytest.raises(OpenDataError, match="32"):
        create_app(settings.model_copy(update={"opendata_secret_file": short}))


def test_public_ids_are_stable_across_restarts_and_keyed_by_the_secret(
        settings: Settings, tmp_path: Path) -> None:
    od = opendata_settings(settings, tmp_path)
    seen = []
    for secret in (od.opendata_secret_file, od.opendata_secret_file, None):
        s = od
        if secret is None:
            other = tmp_path / "other.secret"
            other.write_bytes(b"x" * 32)
            other.chmod(0o600)
            s = od.model_copy(update={"opendata_secret_file": other})
        app = create_app(s, init_db=True)
        with TestClient(app) as client:
            if not seen:
                enroll_device(Api(client, s), 1)
            seen.append([t["@iot.id"] for t in client.get(STA + "/Things").json()["value"]])
        app.state.engine.dispose()
    assert seen[0] == seen[1] and len(seen[0]) == 1
    assert seen[2] != seen[0] and len(seen[2]) == 1


def test_entities_navigation_select_expand_and_errors(world: World) -> None:
    client = world.api.client
    root = client.get(STA).json()
    assert [v["name"] for v in root["value"]] == [
        "Things", "Locations", "Sensors", "ObservedProperties", "Datastreams",
        "Observations"]
    ds = client.get(STA + "/Datastreams", params={"$expand": "Thing,ObservedProperty",
                                                  "$orderby": "name desc"}).json()
    first = ds["value"][0]
    assert first["Thing"]["@iot.id"] and first["ObservedProperty"]["@iot.id"] in (
        "pm25", "temp")
    assert first["Observations@iot.navigationLink"].endswith(
        "/Datastreams('%s')/Observations" % first["@iot.id"])
    one = client.get(first["@iot.selfLink"].removeprefix("http://testserver"),
                     params={"$select": "id,name"}).json()
    assert set(one) == {"@iot.id", "name"}
    obs = client.get(STA + "/Observations", params={"$top": "1"}).json()["value"][0]
    assert isinstance(obs["@iot.id"], int)
    back = client.get(STA + "/Observations(%d)/Datastream" % obs["@iot.id"]).json()
    assert back["unitOfMeasurement"]["symbol"] in ("ug/m3", "Cel")
    for path, params, code in [
        ("/Things('nope')", {}, 404), ("/Nothing", {}, 404), ("/Observations(999999)", {}, 404),
        ("/Things", {"$top": "1001"}, 400), ("/Things", {"$top": "-1"}, 400),
        ("/Things", {"$bogus": "1"}, 400), ("/Things", {"$expand": "Observations"}, 400),
        ("/Things", {"$orderby": "result"}, 400), ("/Things", {"$select": "secret"}, 400),
        ("/Observations", {"$filter": "name eq 'x'"}, 400),
        ("/Things", {"$filter": "x" * 3000}, 414),
        ("/Things", {"$skiptoken": "_1"}, 400),
        ("/Observations", {"$skiptoken": "1e999_1"}, 400),
        ("/Observations", {"$skiptoken": "1_x"}, 400),
        ("/Observations", {"$skiptoken": "1_1", "$orderby": "result,@iot.id"}, 400),
    ]:
        r = client.get(STA + path, params=params)
        assert r.status_code == code, (path, params, r.text)
        assert r.json()["code"] == code


def test_datastream_filter_on_names_and_ids(world: World) -> None:
    client = world.api.client
    all_ds = client.get(STA + "/Datastreams").json()["value"]
    target = all_ds[0]["@iot.id"]
    r = client.get(STA + "/Datastreams", params={
        "$filter": "@iot.id eq '%s' or (not (name ne 'x') and id ne 'y')" % target})
    assert [d["@iot.id"] for d in r.json()["value"]] == [target]
    props = client.get(STA + "/ObservedProperties",
                       params={"$filter": "name eq 'PM2.5'"}).json()["value"]
    assert [p["@iot.id"] for p in props] == ["pm25"]
    every = [t["@iot.id"] for t in client.get(STA + "/Things").json()["value"]]
    assert len(every) == 5 and every == sorted(every)  # by @iot.id unless told
    page = client.get(STA + "/Things", params={"$skip": "2", "$top": "2"}).json()
    assert [t["@iot.id"] for t in page["value"]] == every[2:4]
    assert "$skip=4" in page["@iot.nextLink"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_public_query_over_its_time_limit_is_stopped_and_refused(
        settings: Settings, tmp_path: Path) -> None:
    """Anyone may ask open data for a time window over every public device in id order;
    at city scale PostgreSQL read 90 M rows for one page (bench/scale_queries.py). Here
    1,000,000 published readings (each statement over them takes about 1 s on the test
    machine) and a limit of 100 ms: the query is stopped by the database, answered 400
    with what to narrow, and counted; the next request on the pool still answers."""
    from sqlalchemy import text

    from cityedge_fleet.instruments import OPENDATA_TIMEOUTS

    od = opendata_settings(settings, tmp_path, limits=UNLIMITED.model_copy(
        update={"sta_statement_timeout_ms": 100}))
    app = create_app(od, init_db=True)
    with TestClient(app) as client:
        world = make_world(Api(client, od), od)
        a = world.devices["a"].id
        with app.state.engine.begin() as conn:  # one row copied 1,000,000 times, later on
            conn.execute(text(
                "INSERT INTO reading (t, name, unit, value, batch_seq, status, timebase, "
                "device_id) SELECT r.t + 86400 + g, r.name, r.unit, r.value, r.batch_seq, "
                "r.status, r.timebase, r.device_id FROM reading r, generate_series(1, "
                "1000000) g WHERE r.id = (SELECT min(id) FROM reading WHERE device_id = :a "
                "AND name LIKE '%pm25')"), {"a": a})
        before = OPENDATA_TIMEOUTS._value.get()
        # every observation whose result is above -1, and how many: a scan of them all
        r = client.get(STA + "/Observations", params={
            "$filter": "result gt -1 and result lt 1000000", "$count": "true",
            "$orderby": "result desc", "$top": "1"})
        assert r.status_code == 400, r.text[:300]
        assert "ran over 100 ms and was stopped" in r.json()["message"], r.text
        assert OPENDATA_TIMEOUTS._value.get() == before + 1
        ok = client.get(STA + "/Things", params={"$top": "2"})
        assert ok.status_code == 200 and len(ok.json()["value"]) == 2, ok.text
    app.state.engine.dispose()
