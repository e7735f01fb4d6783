"""Signing in to the web console from a test: an HTTP client (``ConsoleClient`` over a
Starlette ``TestClient`` on https, so the Secure cookie is sent back) and the seeding of a
small fleet the console's pages show (``seed_fleet``)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_fleet import audit
from cityedge_fleet.console.session import COOKIE
from cityedge_fleet.models import (
    ChainStateRow,
    Device,
    DeviceState,
    IngestEvent,
    Reading,
    utcnow,
)

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)


@dataclass
class ConsoleClient:
    client: TestClient

    def sign_in(self, token: str) -> str:
        """Sign in; returns the session's CSRF token (from the first page's forms)."""
        page = self.client.get("/console/login")
        assert page.status_code == 200, page.text
        r = self.client.post("/console/login", data={"csrf": csrf_of(page.text),
                                                     "token": token, "next": "/console/"},
                             follow_redirects=False)
        assert r.status_code == 303, r.text
        assert self.client.cookies.get(COOKIE)
        home = self.client.get(r.headers["location"])
        assert home.status_code == 200, home.text
        return csrf_of(home.text)

    def cookie(self) -> str | None:
        return self.client.cookies.get(COOKIE)


def https_client(app: object) -> TestClient:
    return TestClient(app, base_url="https://testserver")  # type: ignore[arg-type]


SITES = ("harbour", "park", "station")
NAMES = ("temperature", "pm25")


def seed_fleet(engine: Engine, devices: int = 30, *, readings: int = 48) -> list[str]:
    """``devices`` devices over three sites in every state, the first with a day of
    readings, chain state and ingest events; returns the ids."""
    now = utcnow()
    states = (DeviceState.active,) * 6 + (DeviceState.quarantined, DeviceState.registered,
                                          DeviceState.provisioned, DeviceState.retired)
    ids = []
    with Session(engine) as s:
        for i in range(devices):
            did = "urn:dev:mac:0024befffe%06x" % i
            ids.append(did)
            s.add(Device(id=did, serial="SN-%05d" % i, model="ce-air-1" if i % 2 else
                         "ce-noise-2", hardware_class="esp32", site=SITES[i % 3],
                         state=states[i % len(states)], firmware_version="1.%d" % (i % 3),
                         last_seen=now - dt.timedelta(minutes=7 * i) if i % 5 else None,
                         forgeries=3 if states[i % len(states)] == DeviceState.quarantined
                         else 0))
        s.flush()
        first = ids[0]
        start = now.timestamp() - readings * 1800
        for k in range(readings):
            for j, name in enumerate(NAMES):
                s.add(Reading(device_id=first, t=start + k * 1800, name=name,
                              unit="Cel" if j == 0 else "ug/m3",
                              value=(12 + 6 * ((k % 24) / 24)) if j == 0 else 8 + (k % 7),
                              batch_seq=k + 1, status="ok"))
        s.add(ChainStateRow(device_id=first, state=b"\x00", last_seq=readings, missing=2,
                            forgotten=0))
        for status in ("gap", "replay", "forgery"):
            s.add(IngestEvent(device_id=first, status=status, seq=5, missing=2 if
                              status == "gap" else 0, detail="seeded by the test"))
        audit.append(s, actor="seed", action="device.register", outcome=audit.OK,
                     target=first, source="127.0.0.1")
        s.commit()
    return ids


def rotation_campaign(engine: Engine, settings: object, devices: int = 6) -> int:
    """A running key rotation campaign over ``devices`` simulated devices with old keys,
    its first wave started by the real runner; returns its id."""
    from cityedge_fleet import campaign_store, command_key
    from cityedge_fleet.campaign_runner import CampaignRunner

    from support.campaign_sim import SimFleet

    sim = SimFleet(engine, settings)  # type: ignore[arg-type]
    sim.add_devices(devices, issued=utcnow() - dt.timedelta(days=70), site="depot")
    with Session(engine) as s:
        camp, _ = campaign_store.create(s, selector_text="site=depot", wave_size=4,
                                        max_failures="50%", by="seed", confirmed=True)
        s.commit()
        cid = camp.id or 0
    runner = CampaignRunner(engine, settings, command_key.from_settings(settings),  # type: ignore[arg-type]
                            renew=False)
    runner.round(renewal_due=False)
    return cid


class ServerThread:
    """The app under uvicorn on a free loopback port, in a thread (for the browser)."""

    def __init__(self, app: object) -> None:
        import threading

        import uvicorn

        from support.mosquitto import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1",  # type: ignore[arg-type]
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
