"""Fault injection at a small size, exact counts (``support.faults``; ``make chaos`` runs
the large versions): for every fault, no batch a device had acknowledged is lost, none is
stored twice, and the fleet recovers by itself (the recovery time is measured and
printed, not asserted). A crash (kill -9) of the single Mosquitto is not here: it loses
what it acknowledged since its last save (``make chaos`` measures it; docs/OPERATIONS.md
section 8)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import faults
from support.faults import FaultRig
from support.mosquitto import TestPKI
from support.pg import PgCluster

DEVICES = 4


@pytest.fixture
def own_pg() -> Iterator[PgCluster]:
    with faults.own_cluster() as cluster:
        yield cluster


def test_an_ingest_worker_killed_mid_transaction_loses_and_doubles_nothing(
        pki: TestPKI, pg_cluster: PgCluster) -> None:
    with FaultRig(pki, pg_cluster, devices=DEVICES) as rig:
        r = faults.worker_killed(rig)
    assert r.notes["killed_in_transaction"]
    assert r.notes["worker_starts"] == [2, 1]
    faults.check_nothing_lost(r)


def test_postgresql_crashing_under_load_loses_nothing(pki: TestPKI, own_pg: PgCluster) -> None:
    with FaultRig(pki, own_pg, devices=DEVICES) as rig:
        faults.check_nothing_lost(faults.database_restarted(rig))


def test_a_cut_garbled_and_slow_device_link_loses_nothing(pki: TestPKI,
                                                          pg_cluster: PgCluster) -> None:
    with FaultRig(pki, pg_cluster, devices=DEVICES, broker_proxy=True) as rig:
        r = faults.device_link(rig)
    assert r.notes["corrupted_chunks"] > 0
    faults.check_nothing_lost(r)


def test_a_cut_and_slow_database_link_loses_nothing(pki: TestPKI,
                                                    pg_cluster: PgCluster) -> None:
    with FaultRig(pki, pg_cluster, devices=DEVICES, db_proxy=True) as rig:
        faults.check_nothing_lost(faults.database_link(rig))


@pytest.mark.parametrize("hours", [5, -5])
def test_device_clocks_hours_off_store_everything_with_their_time(
        pki: TestPKI, pg_cluster: PgCluster, hours: int) -> None:
    with FaultRig(pki, pg_cluster, devices=DEVICES, skew_s=hours * 3600.0) as rig:
        r = faults.clocks_skewed(rig)
    faults.check_nothing_lost(r)
    lo, hi = r.notes["t_offset_s"]
    assert abs(lo - hours * 3600) < 600 and abs(hi - hours * 3600) < 600


def test_a_herd_reconnecting_at_once_loses_nothing(pki: TestPKI,
                                                   pg_cluster: PgCluster) -> None:
    with FaultRig(pki, pg_cluster, devices=12, broker_proxy=True) as rig:
        r = faults.thundering_herd(rig)
    assert r.notes["reconnected"] == 12
    faults.check_nothing_lost(r)


def test_a_full_database_disk_holds_messages_until_space_is_freed(
        pki: TestPKI, pg_cluster: PgCluster) -> None:
    with FaultRig(pki, pg_cluster, devices=DEVICES) as rig:
        r = faults.database_disk_full(rig)
    assert r.notes["dead_letters"] == 0  # held and stored, not set aside
    faults.check_nothing_lost(r)


def test_a_device_flooding_the_shared_stream_holds_back_nobody(
        pki: TestPKI, pg_cluster: PgCluster) -> None:
    with FaultRig(pki, pg_cluster, devices=DEVICES) as rig:
        r = faults.flood(rig)
    others = r.notes["others_batches"]
    assert r.notes["flooder_batches"] > 2 * max(others)  # it did flood
    assert min(others) > 0
    faults.check_nothing_lost(r)  # and every batch of everyone is stored, once


def test_a_broker_restart_under_load_loses_nothing(pki: TestPKI,
                                                   pg_cluster: PgCluster) -> None:
    """SIGTERM of Mosquitto under load, the worst order: the devices are back and
    acknowledged before the ingest has subscribed again. The ingest's plain subscriptions
    are in the broker's saved session, so those batches wait in its queue."""
    with FaultRig(pki, pg_cluster, devices=DEVICES, workers=1) as rig:
        assert rig.subscription == "plain"  # production's default for one worker
        r = faults.broker_restarted(rig)
    assert r.notes["reconnected"] == DEVICES
    assert r.notes["acked_while_ingest_away"] >= 3 * DEVICES  # the window was there
    faults.check_nothing_lost(r)


def test_shared_subscriptions_do_not_survive_a_mosquitto_restart(
        pki: TestPKI, pg_cluster: PgCluster) -> None:
    """Why one worker holds plain subscriptions on Mosquitto: it saves no shared
    subscription (2.0.11 to 2.0.20 at least), so with the workers on ``$share/...`` every
    batch acknowledged after a restart and before a worker has subscribed again is
    dropped. Should a Mosquitto keep them one day, this fails: then several workers may
    share the stream safely (docs/OPERATIONS.md section 8)."""
    with FaultRig(pki, pg_cluster, devices=DEVICES, workers=2) as rig:
        assert rig.subscription == "shared"
        r = faults.broker_restarted(rig, settle_s=20.0)
    print("\n" + faults.HEADER + "\n" + r.row(), r.notes)
    assert r.notes["acked_while_ingest_away"] >= 3 * DEVICES
    assert r.lost >= r.notes["acked_while_ingest_away"]
    assert r.duplicates_stored == 0
