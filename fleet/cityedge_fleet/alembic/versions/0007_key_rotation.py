"""Device key rotation: ``key_rotation`` holds each device's move to a new key, its state
(``pending -> sent -> csr-received -> issued -> proven -> old-revoked`` or ``failed``),
the keys and commands involved, and the campaign it belongs to (nullable).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_rotation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=True),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.Column("old_kid", AutoString(length=16), nullable=False),
        sa.Column("new_kid", AutoString(length=16), nullable=True),
        sa.Column("new_serial", AutoString(length=64), nullable=True),
        sa.Column("csr_sha256", AutoString(length=64), nullable=True),
        sa.Column("rotate_command_id", sa.Integer(), nullable=True),
        sa.Column("install_command_id", sa.Integer(), nullable=True),
        sa.Column("erase_command_id", sa.Integer(), nullable=True),
        sa.Column("proven_seq", sa.BigInteger(), nullable=True),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_key_rotation_campaign_id", "key_rotation", ["campaign_id"],
                    unique=False)
    op.create_index("ix_key_rotation_state", "key_rotation", ["state"], unique=False)
    op.create_index("ix_key_rotation_device_state", "key_rotation", ["device_id", "state"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_key_rotation_device_state", table_name="key_rotation")
    op.drop_index("ix_key_rotation_state", table_name="key_rotation")
    op.drop_index("ix_key_rotation_campaign_id", table_name="key_rotation")
    op.drop_table("key_rotation")
