"""Ingest bounds: columns that hold whatever the core accepts, a node's gateway, the
malformed counter and the dead-letter table.

- ``reading.name`` widens to a resolved SenML name (bn + n: 192 characters);
- chain and event counts (``missing``, ``forgotten``, ``explained``) become 64-bit: a
  device may jump its seq to 2**48 - 1 (a 32-bit column refused the gap and stopped the
  group);
- ``device.gateway_id`` (the only device that may relay this node's batches) and
  ``device.malformed`` (malformed batches and refused relays, for the quarantine);
- ``ingest_dead_letter``: messages kept when the database refused them alone.

SQLite neither enforces varchar widths nor has a 32-bit integer, so the type changes run
on PostgreSQL only (where widening a varchar and int4 -> int8 are catalogue changes or one
table rewrite; no batch copy of the readings table on SQLite).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BIGINT_COLUMNS = (("chain_state", "missing"), ("chain_state", "forgotten"),
                   ("ingest_event", "missing"), ("ingest_event", "explained"))


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        op.alter_column("reading", "name", type_=AutoString(length=192),
                        existing_type=AutoString(length=128), existing_nullable=False)
        for table, column in _BIGINT_COLUMNS:
            op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(),
                            existing_nullable=False)
    op.add_column("device", sa.Column("gateway_id", AutoString(length=128), nullable=True))
    op.add_column("device", sa.Column("malformed", sa.Integer(), nullable=False,
                                      server_default="0"))
    op.create_index("ix_device_gateway_id", "device", ["gateway_id"], unique=False)
    op.create_table(
        "ingest_dead_letter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("topic", sa.LargeBinary(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("publisher", AutoString(length=128), nullable=True),
        sa.Column("error", AutoString(length=512), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ingest_dead_letter_publisher", "ingest_dead_letter", ["publisher"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_ingest_dead_letter_publisher", table_name="ingest_dead_letter")
    op.drop_table("ingest_dead_letter")
    op.drop_index("ix_device_gateway_id", table_name="device")
    with op.batch_alter_table("device") as batch:
        batch.drop_column("malformed")
        batch.drop_column("gateway_id")
    if _postgresql():
        for table, column in _BIGINT_COLUMNS:
            op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(),
                            existing_nullable=False)
        op.alter_column("reading", "name", type_=AutoString(length=128),
                        existing_type=AutoString(length=192), existing_nullable=False)
