"""Readings in time partitions: ``reading.stored_at`` (when the ingest stored the row, the
database's ``now()``) and, on PostgreSQL, ``reading`` range-partitioned on it
(``reading_partitions``).

PostgreSQL: the table as it was becomes the partition ``reading_legacy`` (every row up to
the end of the migration's UTC day; its rows get the migration's time, a catalogue-only
default), the id sequence moves to the new parent (dropping a partition never drops it),
``reading_default`` takes rows no partition covers, and the next 7 days get their
partitions (``cityedge fleet retention`` makes the later ones). The primary key becomes
``(id, stored_at)``: a partitioned table's unique keys hold its partition key.

SQLite: ``reading`` stays one table; it gets the column (a table copy: SQLite adds no
column with a non-constant default) and an index for the retention's delete.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 12:00:00
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None
DAYS_AHEAD = 7


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgresql():
        with op.batch_alter_table("reading", recreate="always") as batch:
            batch.add_column(sa.Column("stored_at", sa.DateTime(timezone=True),
                                       nullable=False, server_default=sa.func.now()))
        op.create_index("ix_reading_stored_at", "reading", ["stored_at"])
        return
    now = dt.datetime.now(dt.UTC)
    day = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    for sql in (
        "ALTER TABLE reading ADD COLUMN stored_at timestamptz NOT NULL DEFAULT now()",
        "ALTER TABLE reading RENAME TO reading_legacy",
        "ALTER INDEX ix_reading_device_t RENAME TO ix_reading_legacy_device_t",
        "ALTER TABLE reading_legacy DROP CONSTRAINT reading_pkey",
        "ALTER TABLE reading_legacy ADD CONSTRAINT reading_legacy_pkey "
        "PRIMARY KEY (id, stored_at)",
        "CREATE TABLE reading (LIKE reading_legacy INCLUDING DEFAULTS) "
        "PARTITION BY RANGE (stored_at)",
        "ALTER TABLE reading ADD CONSTRAINT reading_pkey PRIMARY KEY (id, stored_at)",
        "CREATE INDEX ix_reading_device_t ON reading (device_id, t)",
        "ALTER SEQUENCE reading_id_seq OWNED BY reading.id",
        "ALTER TABLE reading ATTACH PARTITION reading_legacy FOR VALUES FROM (MINVALUE) "
        "TO ('%s')" % day.isoformat(),
        "CREATE TABLE reading_default PARTITION OF reading DEFAULT",
    ):
        op.execute(sql)
    for _ in range(DAYS_AHEAD):
        end = day + dt.timedelta(days=1)
        op.execute("CREATE TABLE reading_p%s PARTITION OF reading FOR VALUES FROM ('%s') "
                   "TO ('%s')" % (day.strftime("%Y%m%d"), day.isoformat(), end.isoformat()))
        day = end


def downgrade() -> None:
    if not _postgresql():
        op.drop_index("ix_reading_stored_at", "reading")
        with op.batch_alter_table("reading") as batch:
            batch.drop_column("stored_at")
        return
    for sql in (
        "CREATE TABLE reading_plain (LIKE reading INCLUDING DEFAULTS)",
        "INSERT INTO reading_plain SELECT * FROM reading",
        "ALTER SEQUENCE reading_id_seq OWNED BY reading_plain.id",
        "DROP TABLE reading",
        "ALTER TABLE reading_plain RENAME TO reading",
        "ALTER TABLE reading DROP COLUMN stored_at",
        "ALTER TABLE reading ADD CONSTRAINT reading_pkey PRIMARY KEY (id)",
        "CREATE INDEX ix_reading_device_t ON reading (device_id, t)",
    ):
        op.execute(sql)
