"""The console's server-drawn chart: whatever the readings and names (a device chooses
its reading names), the SVG is well-formed, names are text never markup, every point is
inside the drawing, and non-finite values are left out."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_fleet.console.chart import HEIGHT, POINTS_MAX, WIDTH, line_chart

SVG = "{http://www.w3.org/2000/svg}"
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=80), unit=st.none() | st.text(max_size=16),
       points=st.lists(st.tuples(floats, floats), max_size=POINTS_MAX + 20))
def test_any_series_draws_well_formed_svg_inside_its_box(name: str, unit: str | None,
                                                         points: list[tuple[float, float]]
                                                         ) -> None:
    points.sort(key=lambda p: p[0] if math.isfinite(p[0]) else 0.0)
    out = line_chart(name, unit, points)
    finite = [p for p in points[-POINTS_MAX:] if all(math.isfinite(v) for v in p)]
    if not finite:
        assert out.startswith('<p class="empty">') and "<script" not in out
        ET.fromstring(out)
        return
    root = ET.fromstring(out)  # well-formed: a name cannot open an element
    assert root.tag == SVG + "svg"
    assert [c.tag for c in root].count(SVG + "script") == 0
    title = root.find(SVG + "title")
    assert title is not None
    if name.isalnum():
        assert (title.text or "").startswith(name)
    line = root.find(SVG + "polyline")
    assert line is not None
    xy = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
    assert len(xy) == len(finite)
    for x, y in xy:
        assert -0.1 <= x <= WIDTH + 0.1 and -0.1 <= y <= HEIGHT + 0.1
