"""Messages the ingest could not store even on their own, kept as received (dead letters).

When a group's transaction fails, ``ingest_mqtt.MqttIngestWorker`` stores its messages one
transaction each; a message that still fails alone (``ingest_attempts`` tries) is passed
to ``keep``, which writes its topic and payload, its publisher and the error to
``ingest_dead_letter`` with an ``IngestEvent`` (status ``dead_letter``), in a transaction
of its own. The worker then acknowledges it: nothing acknowledged is lost, and no message
holds back the ones after it. If ``keep`` fails too, the database is down, and the worker
acknowledges nothing until it is back. A failure that says the database lacks a resource
or is unavailable (``unavailable``: a full disk, out of memory or connections, a lost
connection, a shutdown, a deadlock, SQLite's lock or I/O error) is never the message's
fault: the message is held as with the database down, whatever ``keep`` could do (space
freed between the message's last try and its dead letter had set a good batch aside).

``replay`` runs the kept messages through an ``Ingestor`` again, oldest first, once the
cause is fixed, and deletes each one the ingest has now decided (stored or refused, with
its event). A message's chain verdict is what it would have had arriving that late (a
reordered batch, usually). On the fleet host: ``cityedge fleet replay-dead-letters``.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from cityedge_fleet.config import Settings
from cityedge_fleet.db import open_database
from cityedge_fleet.ingest import DEAD_LETTER, Ingestor, Outcome, bounded_text, parse_topic
from cityedge_fleet.models import IngestDeadLetter, IngestEvent

log = logging.getLogger(__name__)


def describe(error: BaseException) -> str:
    """The error as a dead letter records it: its type and the database's own message
    (``orig``), not SQLAlchemy's text, which repeats the statement's parameters."""
    cause = getattr(error, "orig", None) or error
    return bounded_text("%s: %s" % (type(cause).__name__, cause))


# SQLSTATE classes of a database that cannot take a write now, whatever the message: 08
# connection exception, 53 insufficient resources (53100 disk full, 53200 out of memory,
# 53300 too many connections), 58 system error (58030 I/O error), 40 transaction rollback
# (serialization failure, deadlock); and 57P, a server shutting down or starting
# (57014, a cancelled statement, is left out: a timeout a message could cause each time)
UNAVAILABLE_CLASSES = ("08", "53", "58", "40", "57P")
# SQLite's words for the same (``sqlite3.OperationalError``'s text)
UNAVAILABLE_SQLITE = ("database is locked", "database or disk is full", "disk I/O error",
                      "unable to open database file", "database table is locked")


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot take a write now (a resource, the
    connection, a shutdown, a lock), not that it refused this message."""
    cause = getattr(error, "orig", None) or error
    state = getattr(cause, "sqlstate", None)
    if isinstance(state, str):
        return state.startswith(UNAVAILABLE_CLASSES)
    if type(cause).__name__ == "OperationalError" and type(cause).__module__ == "sqlite3":
        return any(words in str(cause) for words in UNAVAILABLE_SQLITE)
    return False


def keep(engine: Engine, topic: str, payload: bytes, error: str, max_bytes: int) -> int:
    """Store one message as a dead letter with its event; returns the row id. Raises only
    if the database refuses this too (nothing in it comes from the message unbounded)."""
    parsed = parse_topic(topic)
    publisher = parsed[0] if parsed is not None else None
    error = bounded_text(error)
    with Session(engine) as session:
        row = IngestDeadLetter(topic=topic.encode("utf-8", "replace"),
                               payload=bytes(payload[:max_bytes]), size=len(payload),
                               publisher=publisher, error=error)
        session.add(row)
        session.add(IngestEvent(device_id=publisher or "", status=DEAD_LETTER,
                                detail=bounded_text("kept aside, %d bytes: %s"
                                                    % (len(payload), error))))
        session.commit()
        assert row.id is not None
        log.error("dead letter %d from %s (%d bytes): %s", row.id, publisher, len(payload),
                  error)
        return row.id


def replay(ingestor: Ingestor, limit: int = 100) -> list[tuple[int, Outcome | str]]:
    """Run up to ``limit`` dead letters through ``ingestor`` again, oldest first; returns
    ``(id, outcome)`` for each one decided (and deleted) and ``(id, error)`` for each one
    that fails again (kept, with the new error)."""
    with Session(ingestor.engine) as session:
        rows = session.exec(select(IngestDeadLetter).order_by(col(IngestDeadLetter.id))
                            .limit(limit)).all()
        letters = [(r.id, r.topic.decode("utf-8", "replace"), r.payload) for r in rows]
    done: list[tuple[int, Outcome | str]] = []
    for row_id, topic, payload in letters:
        assert row_id is not None
        try:
            (outcome,) = ingestor.handle_many([(topic, payload)])
        except Exception as e:  # still refused: keep it, with what happened this time
            error = describe(e)
            with Session(ingestor.engine) as session:
                row = session.get(IngestDeadLetter, row_id)
                if row is not None:
                    row.error = error
                    session.add(row)
                    session.commit()
            done.append((row_id, error))
            continue
        with Session(ingestor.engine) as session:  # a crash before this: replayed twice,
            row = session.get(IngestDeadLetter, row_id)  # and the chain calls the second
            if row is not None:  # a duplicate
                session.delete(row)
                session.commit()
        done.append((row_id, outcome))
    return done


def replay_from_settings(settings: Settings, limit: int = 100
                         ) -> list[tuple[int, Outcome | str]]:
    """``replay`` with the fleet's settings (``cityedge fleet replay-dead-letters``),
    printing one line each."""
    engine = open_database(settings, "write")
    try:
        done = replay(Ingestor(engine, settings), limit)
    finally:
        engine.dispose()
    for row_id, result in done:
        print("dead letter %d: %s" % (row_id, result if isinstance(result, str)
                                      else "%s (%s)" % (result.status, result.device)))
    return done
