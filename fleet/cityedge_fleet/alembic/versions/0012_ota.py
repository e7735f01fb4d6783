"""OTA: ``ota_release`` (a checked release: its signed manifest, release-key list and
the artifact's digest; the artifact itself is a file in the store), ``ota_campaign`` and
``ota_member`` (each device's wave, ``update`` command, download capability's SHA-256,
progress and status).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ota_release",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("component", AutoString(length=32), nullable=False),
        sa.Column("version", AutoString(length=32), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("hw_classes", sa.JSON(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", AutoString(length=64), nullable=False),
        sa.Column("manifest_sha256", AutoString(length=64), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("key_list", sa.LargeBinary(), nullable=False),
        sa.Column("keys_version", sa.Integer(), nullable=False),
        sa.Column("kid", AutoString(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uploaded_by", AutoString(length=128), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("component", "sequence"),
        sa.UniqueConstraint("manifest_sha256"),
    )
    op.create_index("ix_ota_release_sha256", "ota_release", ["sha256"])
    op.create_table(
        "ota_campaign",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("selector", AutoString(length=1024), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("waves_text", AutoString(length=128), nullable=False),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("success", AutoString(length=16), nullable=False),
        sa.Column("success_pct", sa.Float(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("max_failures", AutoString(length=16), nullable=False),
        sa.Column("allowed_failures", sa.Integer(), nullable=False),
        sa.Column("members", sa.Integer(), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["ota_release.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ota_campaign_release_id", "ota_campaign", ["release_id"])
    op.create_index("ix_ota_campaign_state", "ota_campaign", ["state"])
    op.create_table(
        "ota_member",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("command_id", sa.Integer(), nullable=True),
        sa.Column("token_hash", AutoString(length=64), nullable=True),
        sa.Column("progress", AutoString(length=16), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["ota_campaign.id"]),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("campaign_id", "device_id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_ota_member_device_id", "ota_member", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_ota_member_device_id", table_name="ota_member")
    op.drop_table("ota_member")
    op.drop_index("ix_ota_campaign_state", table_name="ota_campaign")
    op.drop_index("ix_ota_campaign_release_id", table_name="ota_campaign")
    op.drop_table("ota_campaign")
    op.drop_index("ix_ota_release_sha256", table_name="ota_release")
    op.drop_table("ota_release")
