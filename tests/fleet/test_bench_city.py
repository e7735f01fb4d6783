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


def test_a_herd_after_a_mosquitto_restart_loses_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--herd`` small: 30 devices connected, Mosquitto stopped (SIGTERM) and started
    again 3 s later; every device reconnects by its own backoff, every acknowledged batch
    is stored once, and the recovery is measured."""
    size = city.HERD_QUICK
    r = city.run(size, ("mosquitto",))
    e = r["engines"]["mosquitto"]
    h = e["herd"]
    assert e["connected"] == e["devices"] == size.devices
    assert h["broker_exit_code"] == 0  # it exited by itself (saved), not killed
    assert size.herd_outage_s <= h["outage_s"] < size.herd_outage_s + 10
    # every device dropped, was refused while the broker was away, and came back
    assert h["reconnected"] == size.devices
    assert h["connect_failures"] >= size.devices and h["attempts"] > size.devices
    assert 0 <= h["back_50_s"] <= h["back_99_s"] <= h["back_100_s"]
    assert h["signed_in_outage"] > 0  # a batch a second each: some signed while it was away
    assert e["acknowledged"] > 0 and e["unsent"] == 0
    assert e["stored"] == e["acknowledged"]  # everything signed was sent and stored
    assert e["lost"] == 0 and e["stored_twice"] == 0
    assert h["recovery_s"] is not None and h["recovery_s"] >= 0
    assert h["broker_cpu_s"] >= 0 and h["signed_before_back"] > 0
    city.report(r)
    out = capsys.readouterr().out
    assert "herd (after the window" in out and "lost 0" in out
