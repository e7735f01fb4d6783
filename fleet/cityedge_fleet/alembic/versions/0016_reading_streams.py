"""``reading_stream``: each (device, SenML name, chain verdict) with at least one reading
in the form open data publishes (a UNIX time in 0 .. 9999-12-31T23:59:59Z and a numeric
value), kept by the ingest from now on (``models.ReadingStream``). Open data's catalogue
reads it instead of grouping every public reading each time it is rebuilt (docs/CAPACITY.md
C8: 22,250 ms at 100,000,000 readings, every ``sta_index_ttl_s`` on every replica).

The upgrade fills it from the readings there are, with that grouped scan, once.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None
TIME_MAX = 253402300799.0  # models.STREAM_TIME_MAX as of this revision
TIME_UNIX = 0  # cityedge_core.batch.TIME_UNIX


def upgrade() -> None:
    op.create_table(
        "reading_stream",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("name", AutoString(length=192), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "name", "status"),
    )
    op.execute(sa.text(
        "INSERT INTO reading_stream (device_id, name, status) "
        "SELECT DISTINCT device_id, name, status FROM reading "
        "WHERE value IS NOT NULL AND timebase = :unix AND t >= 0 AND t <= :tmax"
    ).bindparams(unix=TIME_UNIX, tmax=TIME_MAX))


def downgrade() -> None:
    op.drop_table("reading_stream")
