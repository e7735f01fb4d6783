"""The web console in a real browser: Debian's headless Chromium driven by Playwright
against the real app under uvicorn. Sign in per role and see only what the role may,
filter devices, open a device and read its chart, pause a campaign, see the audit log's
verification fail after a row is tampered with; no console errors on any page; axe-core
finds no serious or critical violation; each page fits a phone's width. Screenshots of
each page go to a temporary folder, or to docs/screenshots/ under `make screenshots`
(the docs site shows them)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, sync_playwright
from sqlalchemy import text

from cityedge_fleet.app import create_app
from cityedge_fleet.config import Settings
from cityedge_fleet.models import Role

from support.console import ServerThread, rotation_campaign, seed_fleet
from support.fleet import Api

# `make screenshots` sets CITYEDGE_SCREENSHOTS=docs/screenshots to refresh the docs' pictures;
# a plain test run writes them beside its other temporary files and leaves the tree clean
SHOTS = Path(os.environ.get("CITYEDGE_SCREENSHOTS")
             or Path(tempfile.gettempdir()) / ("cityedge-screenshots-%d" % os.getpid()))
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
NAV = {  # what each role's menu offers (the API's roles: ``console.access``)
    Role.viewer: ["Overview", "Devices"],
    Role.technician: ["Overview", "Devices", "Enrollment tokens"],
    Role.security: ["Overview", "Devices", "Campaigns", "Audit log", "Hardware reports"],
    Role.release_manager: ["Overview", "Devices", "Campaigns"],
    Role.vendor: ["Hardware reports"],
    Role.admin: ["Overview", "Devices", "Campaigns", "Audit log", "Enrollment tokens",
                 "Hardware reports"],
}


class Site:
    def __init__(self, server: ServerThread, api: Api, ids: list[str], campaign: int) -> None:
        self.server = server
        self.api = api
        self.ids = ids
        self.campaign = campaign


@pytest.fixture
def site(settings: Settings) -> Iterator[Site]:
    app = create_app(settings, init_db=True)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        api = Api(client, settings)
        ids = seed_fleet(api.engine, 30)
        cid = rotation_campaign(api.engine, settings)
        with ServerThread(app) as server:
            yield Site(server, api, ids, cid)
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: run `make setup` (it installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Tab:
    """A page that records every console error and failed request."""

    def __init__(self, browser: Browser, base: str, **context: Any) -> None:
        self.context = browser.new_context(base_url=base, **context)
        self.context.set_default_timeout(10_000)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(
            "failed: %s %s" % (r.url, r.failure)))

    def sign_in(self, token: str) -> None:
        self.page.goto("/console/login")
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_load_state()

    def nav(self) -> list[str]:
        return self.page.locator("nav a").all_inner_texts()

    def close(self) -> None:
        self.context.close()


AXE = Axe()


def check_page(tab: Tab, shot: str | None = None) -> None:
    """No console error, no serious axe violation, fits 390 px; a screenshot."""
    assert tab.errors == [], tab.errors
    results = AXE.run(tab.page)
    serious = [v["id"] for v in results.response["violations"]
               if v["impact"] in ("serious", "critical")]
    assert serious == [], (tab.page.url, results.generate_report())
    assert tab.page.locator("html").get_attribute("lang") == "en"
    assert tab.page.locator("h1").count() == 1
    if shot:
        SHOTS.mkdir(parents=True, exist_ok=True)
        tab.page.screenshot(path=str(SHOTS / shot), full_page=True)
        # the docs show a picture of this page under the same name
        assert (DOCS_SHOTS / shot).is_file(), shot


def test_each_role_sees_only_its_pages(site: Site, browser: Browser) -> None:
    for role, menu in NAV.items():
        tab = Tab(browser, site.server.url)
        tab.sign_in(site.api.token(role))
        assert tab.nav() == menu, role
        for name in ("Overview", "Devices", "Campaigns", "Audit log", "Enrollment tokens",
                     "Hardware reports"):
            href = {"Overview": "/console/", "Devices": "/console/devices",
                    "Campaigns": "/console/campaigns", "Audit log": "/console/audit",
                    "Enrollment tokens": "/console/enrollment",
                    "Hardware reports": "/console/hardware"}[name]
            r = tab.page.goto(href)
            assert r is not None
            assert (r.status == 200) == (name in menu), (role, name, r.status)
        tab.page.goto({"Hardware reports": "/console/hardware"}.get(menu[0], "/console/"))
        tab.page.get_by_role("button", name="Sign out").click()
        tab.page.wait_for_load_state()
        assert tab.page.url.endswith("/console/login")
        r = tab.page.goto("/console/")
        assert r is not None and tab.page.url.startswith(site.server.url + "/console/login")
        tab.close()


def test_overview_devices_and_a_device_chart(site: Site, browser: Browser) -> None:
    tab = Tab(browser, site.server.url, viewport={"width": 1200, "height": 900})
    tab.sign_in(site.api.token(Role.security))
    assert tab.page.get_by_role("heading", name="Overview").is_visible()
    assert tab.page.locator(".tile.state-quarantined .n").inner_text() == "3"
    check_page(tab, "overview.png")
    tab.page.get_by_role("link", name="Devices", exact=True).click()
    tab.page.get_by_label("State").select_option("quarantined")
    tab.page.get_by_label("Site").fill("harbour")
    tab.page.get_by_role("button", name="Filter").click()
    rows = tab.page.locator("table.devices tbody tr")
    assert rows.count() == 1  # devices 6 and 16, 26: quarantined; of them 6 is at harbour
    assert site.ids[6] in rows.first.inner_text()
    assert "state=quarantined" in tab.page.url
    check_page(tab, "devices.png")
    tab.page.goto("/console/devices")
    tab.page.get_by_role("link", name=site.ids[0]).click()
    chart = tab.page.locator("svg.chart").first
    assert chart.is_visible()
    assert chart.get_attribute("role") == "img"
    assert "48 readings" in (tab.page.locator("svg.chart desc").first.text_content() or "")
    points = chart.locator("polyline.series").get_attribute("points") or ""
    assert len(points.split()) == 48
    assert tab.page.locator("figcaption").all_inner_texts()[0].startswith("temperature")
    assert "forgery" in tab.page.locator("#h-events ~ div table").inner_text()
    check_page(tab, "device.png")
    tab.close()


def test_pause_a_campaign_and_see_the_audit_fail(site: Site, browser: Browser) -> None:
    tab = Tab(browser, site.server.url, viewport={"width": 1200, "height": 900})
    tab.sign_in(site.api.token(Role.security))
    tab.page.get_by_role("link", name="Campaigns").click()
    check_page(tab, "campaigns.png")
    tab.page.get_by_role("link", name="#%d" % site.campaign).click()
    assert tab.page.locator("#campaign-state").inner_text() == "running"
    assert tab.page.locator("#h-waves ~ div tbody tr").count() == 1  # wave 1 started
    tab.page.get_by_role("button", name="Pause").click()
    tab.page.wait_for_load_state()
    assert tab.page.locator("#campaign-state").inner_text() == "paused"
    assert tab.page.get_by_role("status").inner_text() == "Done: pause."
    check_page(tab, "campaign.png")
    tab.page.get_by_role("link", name="Audit log").click()
    assert tab.page.locator("#audit-verdict").inner_text().startswith("Verified")
    assert "campaign.pause" in tab.page.locator("table.audit").inner_text()
    check_page(tab, "audit.png")
    with site.api.engine.begin() as c:  # someone edits a row behind the fleet's back
        c.execute(text("UPDATE audit_record SET actor = 'nobody' WHERE id = 1"))
    tab.page.reload()
    verdict = tab.page.locator("#audit-verdict")
    assert verdict.inner_text().startswith("VERIFICATION FAILED")
    assert verdict.get_attribute("role") == "alert"
    assert tab.page.locator("ul.problems li").count() >= 1
    check_page(tab, "audit-failed.png")
    tab.close()


def test_technician_and_vendor_pages_and_the_phone_layout(site: Site,
                                                          browser: Browser) -> None:
    tab = Tab(browser, site.server.url, viewport={"width": 390, "height": 844},
              is_mobile=True, has_touch=True, device_scale_factor=2)
    tab.page.goto("/console/login")
    check_page(tab, "login.png")
    tab.sign_in(site.api.token(Role.technician))
    tab.page.get_by_role("link", name="Enrollment tokens").click()
    tab.page.get_by_label("Device serial").fill("SN-00100")
    tab.page.get_by_role("button", name="Issue token").click()
    token = tab.page.locator("#issued-token").inner_text()
    assert len(token) == 43
    check_page(tab, "enrollment.png")
    tab.page.goto("/console/enrollment")
    assert token not in tab.page.content()
    for path, shot in (("/console/", "overview-phone.png"),
                       ("/console/devices/" + site.ids[0], "device-phone.png")):
        tab.page.goto(path)
        width = tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)  # no sideways scrolling of the page
        check_page(tab, shot)
    tab.close()
    tab = Tab(browser, site.server.url, viewport={"width": 1200, "height": 700})
    tab.sign_in(site.api.token(Role.vendor))
    assert tab.page.get_by_role("heading", name="Hardware reports").is_visible()
    check_page(tab, "hardware.png")
    tab.close()


def test_the_keyboard_reaches_every_control(site: Site, browser: Browser) -> None:
    tab = Tab(browser, site.server.url)
    tab.sign_in(site.api.token(Role.admin))
    tab.page.goto("/console/devices")
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.textContent") == "Skip to content"
    reached = set()
    for _ in range(40):
        tab.page.keyboard.press("Tab")
        reached.add(tab.page.evaluate(
            "document.activeElement.id || document.activeElement.textContent.trim()"))
    assert {"q", "state", "site", "model", "Filter", "Sign out"} <= reached
    tab.close()


@pytest.fixture(scope="module", autouse=True)
def _shots_dir() -> None:
    if SHOTS.exists() and not SHOTS.is_dir():
        shutil.rmtree(SHOTS)
