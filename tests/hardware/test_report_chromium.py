"""The HTML report as a person sees it: rendered by headless Chromium (Debian's ``chromium``,
installed by ``make setup``), the screenshot's banner green when the profile is met and red
when not, the DOM's summary text, and a vendor name holding markup shown as text."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

from cityedge_hardware.check import CheckInputs, check_report
from cityedge_hardware.report_html import write_reports

CAPTURES = Path(str(resources.files("cityedge_hardware").joinpath("captures")))
GREEN, RED = (0x1E, 0x7B, 0x34), (0xB3, 0x26, 0x1E)  # the banner's colours (report.html.j2)
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if not found:  # a real component: never a skip (CI would pass without looking)
        pytest.fail("chromium not found: run `make setup` (installs Debian's chromium)")
    return found


def browse(chromium: str, profile_dir: Path, *args: str) -> str:
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--user-data-dir=%s" % profile_dir, *args],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def report(tmp_path: Path, ids: list[str], vendor: str) -> Path:
    profile = tmp_path / "p.yaml"
    profile.write_text("profile: shot\ntitle: Screenshot test profile\nselect:\n  ids: [%s]\n"
                       % ", ".join(ids))
    doc = check_report(CheckInputs(platform="esp32", efuse_json=CAPTURES / "esp32.json"),
                       str(profile), vendor=vendor, model="Node <b>1</b>")
    return write_reports(doc, tmp_path / "out")[1]


def banner_colour(png: Path) -> tuple[int, int, int]:
    with Image.open(png) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1000, 700)
        corner = rgb.getpixel((8, 8))
        assert corner == rgb.getpixel((990, 60))  # one colour across the banner
        return corner  # type: ignore[return-value]


def near(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return all(abs(x - y) <= 8 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("ids", "met"), [
    (["CE-SYS-01", "CE-SYS-02"], True),  # Pi gateway requirements: not applicable to an ESP32
    (["CE-SYS-01", "CE-BOOT-01", "CE-GOV-04"], False),  # a factory chip, no declaration
])
def test_the_banner_shows_met_or_not_met(chromium: str, tmp_path: Path, ids: list[str],
                                         met: bool) -> None:
    html = report(tmp_path, ids, "Example Sensors Oy")
    shot = tmp_path / "shot.png"
    browse(chromium, tmp_path / "chromium", "--screenshot=%s" % shot, "--window-size=1000,700",
           html.as_uri())
    colour = banner_colour(shot)
    assert near(colour, GREEN if met else RED), colour
    dom = browse(chromium, tmp_path / "chromium", "--dump-dom", html.as_uri())
    verdict = re.search(r'<h1 id="verdict">([^<]*)</h1>', dom)
    assert verdict is not None
    assert verdict.group(1) == "Profile shot: %s" % ("MET" if met else "NOT MET")
    assert ("<span>2 not applicable</span>" if met else "<span>1 fail</span>") in dom
    assert len(re.findall(r'<tr id="CE-', dom)) == len(ids)


def test_markup_in_a_field_is_shown_as_text_not_run(chromium: str, tmp_path: Path) -> None:
    html = report(tmp_path, ["CE-SYS-01"], HOSTILE)
    source = html.read_text()
    assert "<script" not in source and "<img" not in source and "<b>1" not in source
    dom = browse(chromium, tmp_path / "chromium", "--dump-dom", html.as_uri())
    assert "&lt;script&gt;document.title=\"pwned\"&lt;/script&gt;&lt;img src=x " in dom
    assert "<script" not in dom.lower() and "<img" not in dom.lower()
    title = re.search(r"<title>([^<]*)</title>", dom)
    assert title is not None and title.group(1) == "Node &lt;b&gt;1&lt;/b&gt;: shot met"
