"""What the open-data tests share: settings that publish one site and two kinds, a real
uvicorn server for an app in a thread, and a crawler that follows every link of the
SensorThings API (for the leak scans)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from cityedge_fleet.config import OpenDataKind, OpenDataSite, Settings

from support.mosquitto import free_port

PUBLIC_SITE = "harbour"
PRIVATE_SITE = "depot"
# an exact position: open data publishes it rounded to 3 decimals only
LATITUDE = 60.1698765
LONGITUDE = 24.9384321
SITES = {PUBLIC_SITE: {"name": "Harbour air station", "latitude": LATITUDE,
                       "longitude": LONGITUDE}}
KINDS = {
    "pm25": {"name": "PM2.5", "unit_name": "microgram per cubic metre",
             "unit_symbol": "ug/m3", "definition": "https://example.org/def/pm25"},
    "temp": {"name": "Air temperature", "unit_name": "degree Celsius", "unit_symbol": "Cel"},
}


def write_secret(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path


def opendata_settings(settings: Settings, tmp_path: Path, **update: Any) -> Settings:
    """``settings`` publishing ``SITES`` and ``KINDS``, with a new server secret."""
    values: dict[str, Any] = {
        "opendata_secret_file": write_secret(tmp_path / "opendata.secret"),
        "opendata_sites": {k: OpenDataSite(**v) for k, v in SITES.items()},
        "opendata_kinds": {k: OpenDataKind(**v) for k, v in KINDS.items()}, **update}
    return settings.model_copy(update=values)


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` under a real uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield "http://127.0.0.1:%d" % port
    finally:
        server.should_exit = True
        thread.join(30)


def crawl(get: Callable[[str], tuple[int, bytes, Any]], root: str,
          most: int = 2000) -> dict[str, bytes]:
    """Every document reachable from ``root`` by the API's own links (selfLink,
    navigationLink, nextLink, service-document urls, each also with every ``$expand``),
    ``url -> body``. ``get(url)`` returns (status, body, parsed JSON or None)."""
    seen: dict[str, bytes] = {}
    todo = [root]
    while todo and len(seen) < most:
        url = todo.pop()
        if url in seen:
            continue
        status, body, data = get(url)
        seen[url] = body
        assert status == 200, (url, status, body[:200])
        for link in _links(data):
            if link not in seen:
                todo.append(link)
    return seen


def _links(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str) and (key.endswith("Link") or key == "url"):
                yield value
                if key == "@iot.selfLink":
                    yield value + "?$expand=" + _expand_all(value)
            else:
                yield from _links(value)
    elif isinstance(data, list):
        for item in data:
            yield from _links(item)


_EXPAND = {"Things": "Locations,Datastreams", "Locations": "Things",
           "Sensors": "Datastreams", "ObservedProperties": "Datastreams",
           "Datastreams": "Thing,Sensor,ObservedProperty,Observations",
           "Observations": "Datastream"}


def _expand_all(self_link: str) -> str:
    entity_set = self_link.rsplit("/", 1)[-1].split("(", 1)[0]
    return _EXPAND[entity_set]
