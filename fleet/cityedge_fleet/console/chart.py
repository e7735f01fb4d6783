"""A line chart of one reading series as inline SVG, drawn on the server.

No script and no chart library reach the browser: the page's Content-Security-Policy
allows none. The SVG is built from numbers only (every text in it is escaped), carries a
``<title>`` and ``<desc>`` for screen readers, and scales to the page width (``viewBox``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 640, 200  # viewBox units
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 12, 12, 28
POINTS_MAX = 500  # points drawn in one chart (a page reads no more)


NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    """Escaped, without the characters XML 1.0 cannot hold (a name is the device's)."""
    return escape(NOT_XML.sub("\ufffd", value))


def _label(value: float) -> str:
    return "%.4g" % value


def _time(t: float) -> str:
    if 0 <= t < 10**9:  # seconds since boot, not UNIX time
        return "+%ds" % t
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):  # beyond what a date can say
        return _label(t)


def _frac(a: float, lo: float, hi: float) -> float:
    """Where ``a`` lies between ``lo`` and ``hi``, 0..1 (0.5 when they are equal), also
    when ``hi - lo`` overflows a float (a device may send any finite value)."""
    if hi <= lo:
        return 0.5
    span = hi - lo
    f = (a - lo) / span if math.isfinite(span) else (a / 2 - lo / 2) / (hi / 2 - lo / 2)
    return min(max(f, 0.0), 1.0)


def line_chart(name: str, unit: str | None, points: Sequence[tuple[float, float]]) -> str:
    """``points``: (t, value), oldest first. Returns an ``<svg>`` element as text."""
    pts = [(t, v) for t, v in points[-POINTS_MAX:] if math.isfinite(t) and math.isfinite(v)]
    title = "%s%s" % (name, " (%s)" % unit if unit else "")
    if not pts:
        return ('<p class="empty">No numeric readings of %s.</p>' % _text(title))
    t0, t1 = min(t for t, _ in pts), max(t for t, _ in pts)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    w = WIDTH - PAD_LEFT - PAD_RIGHT
    h = HEIGHT - PAD_TOP - PAD_BOTTOM

    def xy(t: float, v: float) -> str:
        return "%.1f,%.1f" % (PAD_LEFT + _frac(t, t0, t1) * w,
                              PAD_TOP + (1 - _frac(v, lo, hi)) * h)

    line = " ".join(xy(t, v) for t, v in pts)
    desc = "%d readings from %s to %s; lowest %s, highest %s, latest %s" % (
        len(pts), _time(t0), _time(t1), _label(min(v for _, v in pts)),
        _label(max(v for _, v in pts)), _label(pts[-1][1]))
    bottom = PAD_TOP + h
    parts = [
        '<svg class="chart" viewBox="0 0 %d %d" role="img" aria-labelledby="%s-t %s-d" '
        'xmlns="http://www.w3.org/2000/svg">' % (WIDTH, HEIGHT, _id(name), _id(name)),
        '<title id="%s-t">%s</title>' % (_id(name), _text(title)),
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
