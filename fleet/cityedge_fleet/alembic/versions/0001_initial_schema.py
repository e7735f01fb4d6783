"""Initial schema: devices, tags, credentials, API and enrollment tokens, allow-list,
audit log, chain states, readings and ingest events.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 01:31:58.883984
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "allowed_serial",
        sa.Column("serial", AutoString(length=128), nullable=False),
        sa.Column("manifest", AutoString(length=128), nullable=False),
        sa.Column("added_by", AutoString(length=128), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_table(
        "api_token",
        sa.Column("name", AutoString(length=128), nullable=False),
        sa.Column("role", AutoString(length=32), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", AutoString(length=64), nullable=False),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "audit_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", AutoString(length=32), nullable=False),
        sa.Column("actor", AutoString(length=128), nullable=False),
        sa.Column("action", AutoString(length=64), nullable=False),
        sa.Column("target", AutoString(length=256), nullable=False),
        sa.Column("source", AutoString(length=64), nullable=False),
        sa.Column("outcome", AutoString(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", AutoString(length=64), nullable=False),
        sa.Column("hash", AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hash"),
    )
    with op.batch_alter_table("audit_record", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_record_action"), ["action"], unique=False)

    op.create_table(
        "device",
        sa.Column("serial", AutoString(length=128), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("hardware_class", AutoString(length=128), nullable=False),
        sa.Column("site", AutoString(length=128), nullable=False),
        sa.Column("firmware_version", AutoString(length=128), nullable=False),
        sa.Column("id", AutoString(length=128), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("forgeries", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("serial"),
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_device_firmware_version"), ["firmware_version"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_device_hardware_class"), ["hardware_class"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_device_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_site"), ["site"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_state"), ["state"], unique=False)

    op.create_table(
        "enrollment_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", AutoString(length=64), nullable=False),
        sa.Column("serial", AutoString(length=128), nullable=False),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_token_serial"), ["serial"], unique=False)

    op.create_table(
        "ingest_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", AutoString(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.Column("explained", sa.Integer(), nullable=False),
        sa.Column("detail", AutoString(length=512), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ingest_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ingest_event_device_id"), ["device_id"], unique=False)

    op.create_table(
        "reading",
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("name", AutoString(length=128), nullable=False),
        sa.Column("unit", AutoString(length=64), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("vs", sa.Text(), nullable=True),
        sa.Column("vb", sa.Boolean(), nullable=True),
        sa.Column("vd", sa.Text(), nullable=True),
        sa.Column("sum", sa.Float(), nullable=True),
        sa.Column("batch_seq", sa.BigInteger(), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("timebase", sa.Integer(), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reading", schema=None) as batch_op:
        batch_op.create_index("ix_reading_device_t", ["device_id", "t"], unique=False)

    op.create_table(
        "chain_state",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.Column("forgotten", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "credential",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("serial", AutoString(length=64), nullable=False),
        sa.Column("kid", AutoString(length=16), nullable=False),
        sa.Column("public_key", AutoString(length=130), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kid"),
        sa.UniqueConstraint("serial"),
    )
    with op.batch_alter_table("credential", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_credential_device_id"), ["device_id"], unique=False)

    op.create_table(
        "device_tag",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("tag", AutoString(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("device_id", "tag"),
    )
    with op.batch_alter_table("device_tag", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_tag_tag"), ["tag"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("device_tag", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_tag_tag"))

    op.drop_table("device_tag")
    with op.batch_alter_table("credential", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_credential_device_id"))

    op.drop_table("credential")
    op.drop_table("chain_state")
    with op.batch_alter_table("reading", schema=None) as batch_op:
        batch_op.drop_index("ix_reading_device_t")

    op.drop_table("reading")
    with op.batch_alter_table("ingest_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingest_event_device_id"))

    op.drop_table("ingest_event")
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_token_serial"))

    op.drop_table("enrollment_token")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_state"))
        batch_op.drop_index(batch_op.f("ix_device_site"))
        batch_op.drop_index(batch_op.f("ix_device_model"))
        batch_op.drop_index(batch_op.f("ix_device_hardware_class"))
        batch_op.drop_index(batch_op.f("ix_device_firmware_version"))

    op.drop_table("device")
    with op.batch_alter_table("audit_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_record_action"))

    op.drop_table("audit_record")
    op.drop_table("api_token")
    op.drop_table("allowed_serial")
