"""API tokens may be scoped to sites (``api_token.sites``, a JSON list; empty = unscoped).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # existing tokens keep what they could do: unscoped
    op.add_column("api_token", sa.Column("sites", sa.JSON(), nullable=False,
                                         server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("api_token") as batch:
        batch.drop_column("sites")
