"""Command key rotation: ``command_key_rotation`` holds each root-signed trust statement
the fleet rolls out (its version, bytes, the old and new command keys, the overlap, the
switch threshold and state ``rolling-out -> switched`` or ``abandoned``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "command_key_rotation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("statement", sa.LargeBinary(), nullable=False),
        sa.Column("statement_sha256", AutoString(length=64), nullable=False),
        sa.Column("old_kid", AutoString(length=16), nullable=False),
        sa.Column("new_kid", AutoString(length=16), nullable=False),
        sa.Column("keep_old_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold_pct", sa.Integer(), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version"),
    )
    op.create_index("ix_command_key_rotation_state", "command_key_rotation", ["state"])


def downgrade() -> None:
    op.drop_index("ix_command_key_rotation_state", table_name="command_key_rotation")
    op.drop_table("command_key_rotation")
