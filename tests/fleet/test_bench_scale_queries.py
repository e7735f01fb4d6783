"""``bench/scale_queries.py`` at its smoke size against a throwaway PostgreSQL: the
database is filled through the migrations' schema, every list endpoint answers through
the app and its auth with the rows the fill implies, and the report has its figures."""

from __future__ import annotations

import pytest

from bench import scale_queries as sq

pytestmark = pytest.mark.timeout(600)


def test_quick_size_fills_measures_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    r = sq.run(sq.QUICK, sq.QUICK_BASELINE, runs=1, requests=3)
    listed = sq.queries(sq.QUICK, sq.dt.datetime.now(sq.dt.UTC), "x", "")
    names = [q.name for q in listed]
    timed = {q.name for q in listed if q.timed}
    assert len(timed) == len(names) - 1
    for label, size in (("baseline", sq.QUICK_BASELINE), ("big", sq.QUICK)):
        part = r[label]
        assert (part["devices"], part["readings"]) == (size.devices, size.readings)
        assert list(part["queries"]) == names
        assert part["database_bytes"] > 0
        assert set(part["fill_s"]) == {"devices", "audit", "readings", "streams", "vacuum_analyze",
                                       "total"}
        site_day = part["queries"]["STA: Observations of the open site over a day"]
        assert "plan_without_ix_reading_t" in site_day  # the plan before migration 0015
        for name, q in part["queries"].items():
            assert q["statements"] >= 1, (label, name)
            assert q["plan"]["scans"], (label, name)  # every query read a table
            for key in (k for k in q if k.startswith("plan_without_")):
                assert q[key]["rows_read"] > 0 and q[key]["execution_ms"] > 0
            assert q["plan"]["rows_read"] > 0 and q["plan"]["execution_ms"] > 0
            assert q["plan"]["indexed"] == (not q["plan"]["seq_scans_of_big_tables"]
                                            and q["plan"]["rows_read"] <= sq.ROWS_READ_MAX
                                            and not q["plan"]["timed_out"])
            if name in timed:
                assert q["rows"] == q["expected_rows"] > 0, (label, name, q)
                assert 0 < q["p50_ms"] <= q["p99_ms"], (label, name)
            elif label == "baseline":  # the table walk: one request, through the app
                assert q["rows"] == q["expected_rows"] > 0, (label, name, q)
                assert q["once_ms"] > 0
    for name, q in r["big"]["queries"].items():
        base = r["baseline"]["queries"][name]
        assert q["ratio_rows_read"] == pytest.approx(
            q["plan"]["rows_read"] / base["plan"]["rows_read"])
        if name not in timed:
            continue
        assert q["ratio_p50"] == pytest.approx(q["p50_ms"] / base["p50_ms"])
        assert q["ratio_p99"] == pytest.approx(q["p99_ms"] / base["p99_ms"])
    sq.report(r)
    out = capsys.readouterr().out
    for name in names:
        assert name in out
