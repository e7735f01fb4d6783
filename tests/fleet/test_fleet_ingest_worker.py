"""The MQTT ingest worker's grouping: messages are stored a group per transaction and
acknowledged only after that transaction committed, in the order received. What happens
when the database refuses a group: ``test_fleet_ingest_fallback.py`` (real failures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cityedge_fleet.config import FleetLimits, Settings
from cityedge_fleet.ingest import Outcome
from cityedge_fleet.ingest_mqtt import MqttIngestWorker

from support.fleet import FakeMessage, offline_worker, wait_for


class FakeIngestor:
    """Records the groups it is given (the grouping, without a database)."""

    def __init__(self) -> None:
        self.groups: list[list[tuple[str, bytes]]] = []

    def handle_many(self, messages: list[tuple[str, bytes]]) -> list[Outcome]:
        self.groups.append(messages)
        return [Outcome("ok", None) for _ in messages]


def _worker(tmp_path: Path, ingestor: Any) -> tuple[MqttIngestWorker, list[int]]:
    settings = Settings(mode="development", database_url="sqlite://", ca_dir=tmp_path)
    return offline_worker(settings, tmp_path, ingestor=ingestor, limits=FleetLimits(
        ingest_group_max_messages=4, ingest_attempts=2, ingest_retry_s=0.01,
        ingest_group_max_s=0.2))


def test_groups_are_acknowledged_after_commit_in_order(tmp_path: Path) -> None:
    ing = FakeIngestor()
    worker, acks = _worker(tmp_path, ing)
    for mid in range(1, 11):
        worker._on_message(None, None, FakeMessage(mid))
    worker._start_thread()
    try:
        assert wait_for(lambda: len(acks) == 10, timeout=5), acks
    finally:
        worker._stopping.set()
        assert worker._thread is not None
        worker._thread.join(5)
    assert acks == list(range(1, 11))
    assert [len(g) for g in ing.groups] == [4, 4, 2]  # at most 4 per transaction
    assert worker.groups == 3
