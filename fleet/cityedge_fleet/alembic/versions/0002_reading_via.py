"""Readings remember the gateway that relayed their batch (``reading.via``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reading", sa.Column("via", AutoString(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reading") as batch:
        batch.drop_column("via")
