"""The documentation site (``mkdocs.yml``): it builds with ``mkdocs build --strict`` (a
broken link, a missing page or screenshot fails), has a guide per role, and each guide
shows the console's screenshots that the browser tests take."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ("technician", "security-team", "release-manager", "vendor", "operator")
IMAGE = re.compile(r"!\[[^\]]+\]\(([^)]+)\)")


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    for guide in GUIDES:
        page = tmp_path / "site" / "guides" / guide / "index.html"
        assert page.is_file(), guide
    assert (tmp_path / "site" / "screenshots" / "device.png").is_file()


def test_a_guide_per_role_with_the_consoles_screenshots() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = yaml.safe_dump(config["nav"])
    for guide in GUIDES:
        path = ROOT / "docs" / "guides" / ("%s.md" % guide)
        assert "guides/%s.md" % guide in nav
        images = IMAGE.findall(path.read_text())
        assert images, "%s shows no screenshot" % guide
        for image in images:
            assert image.startswith("../screenshots/"), image
            assert (path.parent / image).resolve().is_file(), image
    shown = {Path(i).name for i in IMAGE.findall((ROOT / "docs" / "console.md").read_text())}
    taken = {p.name for p in (ROOT / "docs" / "screenshots").glob("*.png")}
    assert shown <= taken and len(shown) >= 10
