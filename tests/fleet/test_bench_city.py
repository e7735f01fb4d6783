"""``bench/city.py`` at its smoke size: a few fast devices (real mTLS MQTT, signed batches)
through the three-node RabbitMQ cluster and through Mosquitto, in one run, into a
throwaway PostgreSQL with two ``cityedge fleet ingest`` processes; every figure the report
prints is there, and every batch a device saw acknowledged is stored, once."""

from __future__ import annotations

import math

import pytest

from bench import city

pytestmark = pytest.mark.timeout(900)


def test_quick_size_runs_both_engines_and_loses_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    r = city.run(city.QUICK)
    assert list(r["engines"]) == list(city.ENGINES)
    for engine, e in r["engines"].items():
        assert e["connected"] == e["devices"] == city.QUICK.devices, engine
        assert e["acknowledged"] > 0 and e["unsent"] == 0, engine
        assert e["stored"] == e["acknowledged"], engine  # nothing else was signed
        assert e["lost"] == 0 and e["stored_twice"] == 0, engine
        # the window saw commits, and the batches signed in it have a commit timestamp
        assert e["readings_per_s"] > 0 and e["latency_batches"] > 0, engine
        assert 0 < e["p50_s"] <= e["p99_s"] <= e["max_s"], engine
        assert set(e["cpu_s"]) == {"workers", "broker", "postgresql", "devices"}
        assert e["cpu_s"]["workers"] > 0 and e["cpu_s"]["postgresql"] > 0, engine
        assert all(not math.isnan(v) for v in e["cpu_s_per_1000_readings"].values())
    city.report(r)
    out = capsys.readouterr().out
    for name in city.NAMES.values():
        assert name in out
    assert "lost 0" in out
