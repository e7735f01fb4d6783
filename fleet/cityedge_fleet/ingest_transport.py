"""The one place that picks the ingest's transport for the configured broker engine.

Every transport is an ``ingest_mqtt.MqttIngestWorker`` as far as its callers know: built
from an ``Ingestor`` and the ``Settings``, ``start()`` / ``stop()`` / ``alive()`` /
``run_forever()``, the events ``connected`` and ``subscribed``, and the counts ``groups``,
``dead_letters`` and ``database_down``. Another engine adds a module beside
``ingest_amqp`` and one line here.
"""

from __future__ import annotations

from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker


def ingest_worker(ingestor: Ingestor, settings: Settings) -> MqttIngestWorker:
    """The ingest worker for ``settings.broker_engine`` (not started)."""
    if settings.broker_engine == "rabbitmq":
        from cityedge_fleet.ingest_amqp import AmqpIngestWorker

        return AmqpIngestWorker(ingestor, settings)
    return MqttIngestWorker(ingestor, settings)
