"""Rotation campaigns and renewal: ``rotation_campaign`` (a selector, waves, a failure
threshold, its state), ``campaign_member`` (each selected device: its wave, tries and the
rotation it is on) and ``key_expiry_flag`` (devices whose certificate expired before they
were renewed: they need a technician, flagged and audited once).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotation_campaign",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("selector", AutoString(length=1024), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("wave_size", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("max_failures", AutoString(length=16), nullable=False),
        sa.Column("allowed_failures", sa.Integer(), nullable=False),
        sa.Column("members", sa.Integer(), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rotation_campaign_state", "rotation_campaign", ["state"])
    op.create_table(
        "campaign_member",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotation_id", sa.Integer(), nullable=True),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["rotation_campaign.id"]),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("campaign_id", "device_id"),
    )
    op.create_index("ix_campaign_member_device_id", "campaign_member", ["device_id"])
    op.create_table(
        "key_expiry_flag",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("serial", AutoString(length=64), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("flagged_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("device_id", "serial"),
    )


def downgrade() -> None:
    op.drop_table("key_expiry_flag")
    op.drop_index("ix_campaign_member_device_id", table_name="campaign_member")
    op.drop_table("campaign_member")
    op.drop_index("ix_rotation_campaign_state", table_name="rotation_campaign")
    op.drop_table("rotation_campaign")
