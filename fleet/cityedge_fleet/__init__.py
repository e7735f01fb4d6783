"""The fleet service: device registry, CA, gated enrollment, roles, audit log and the
ingest that verifies every signed batch.

Entry points: ``app.create_app(settings)`` (FastAPI), ``ingest.Ingestor`` (one message's
verdict, no I/O) with ``ingest.MqttIngestWorker`` around it, and the ``cityedge fleet``,
``ca``, ``audit`` and ``broker`` commands in ``cli``.
"""
