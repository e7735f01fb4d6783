"""A line chart of one reading series as inline SVG, drawn on the server.

No script and no chart library reach the browser: the page's Content-Security-Policy
allows none. The SVG is built from numbers only (every text in it is escaped), carries a
``<title>`` and ``<desc>`` for screen readers, and scales to the page width (``viewBox``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 640, 200  # viewBox units
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 12, 12, 28
POINTS_MAX = 500  # points drawn in one chart (a page reads no more)


def _label(value: float) -> str:
    return "%.4g" % value


def _time(t: float) -> str:
    if t < 10**9:  # seconds since boot, not UNIX time
        return "+%ds" % t
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%m-%d %H:%M")


def line_chart(name: str, unit: str | None, points: Sequence[tuple[float, float]]) -> str:
    """``points``: (t, value), oldest first. Returns an ``<svg>`` element as text."""
    pts = [(t, v) for t, v in points[-POINTS_MAX:] if math.isfinite(t) and math.isfinite(v)]
    title = "%s%s" % (name, " (%s)" % unit if unit else "")
    if not pts:
        return ('<p class="empty">No numeric readings of %s.</p>' % escape(title))
    t0, t1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    span_t = (t1 - t0) or 1.0
    w = WIDTH - PAD_LEFT - PAD_RIGHT
    h = HEIGHT - PAD_TOP - PAD_BOTTOM

    def xy(t: float, v: float) -> str:
        return "%.1f,%.1f" % (PAD_LEFT + (t - t0) / span_t * w,
                              PAD_TOP + (hi - v) / (hi - lo) * h)

    line = " ".join(xy(t, v) for t, v in pts)
    desc = "%d readings from %s to %s; lowest %s, highest %s, latest %s" % (
        len(pts), _time(t0), _time(t1), _label(min(v for _, v in pts)),
        _label(max(v for _, v in pts)), _label(pts[-1][1]))
    bottom = PAD_TOP + h
    parts = [
        '<svg class="chart" viewBox="0 0 %d %d" role="img" aria-labelledby="%s-t %s-d" '
        'xmlns="http://www.w3.org/2000/svg">' % (WIDTH, HEIGHT, _id(name), _id(name)),
        '<title id="%s-t">%s</title>' % (_id(name), escape(title)),
        '<desc id="%s-d">%s</desc>' % (_id(name), escape(desc)),
        '<line class="axis" x1="%d" y1="%d" x2="%d" y2="%d"/>' % (
            PAD_LEFT, PAD_TOP, PAD_LEFT, bottom),
        '<line class="axis" x1="%d" y1="%d" x2="%d" y2="%d"/>' % (
            PAD_LEFT, bottom, WIDTH - PAD_RIGHT, bottom),
        '<text class="tick" x="%d" y="%d" text-anchor="end">%s</text>' % (
            PAD_LEFT - 4, PAD_TOP + 10, escape(_label(hi))),
        '<text class="tick" x="%d" y="%d" text-anchor="end">%s</text>' % (
            PAD_LEFT - 4, bottom, escape(_label(lo))),
        '<text class="tick" x="%d" y="%d">%s</text>' % (
            PAD_LEFT, HEIGHT - 8, escape(_time(t0))),
        '<text class="tick" x="%d" y="%d" text-anchor="end">%s</text>' % (
            WIDTH - PAD_RIGHT, HEIGHT - 8, escape(_time(t1))),
        '<polyline class="series" points="%s"/>' % line,
        "</svg>",
    ]
    return "".join(parts)


def _id(name: str) -> str:
    return "chart-" + "".join(c if c.isalnum() else "-" for c in name)[:64]
