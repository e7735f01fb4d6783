"""Fleet commands: ``fleet_command`` holds each signed command for one device, its
delivery (tries, sends, when) and the device's signed result.

A device's commands carry strictly increasing sequence numbers: ``(device_id, seq)`` is
unique, the backstop of the row lock on the device that assigns them (``command_queue``).
``(state, next_try_at)`` is what the publisher looks up every round.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_command",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("name", AutoString(length=32), nullable=False),
        sa.Column("args", sa.JSON(), nullable=True),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.Column("kid", AutoString(length=16), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("created_by", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("first_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_try_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("result_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result_detail", AutoString(length=512), nullable=False),
        sa.Column("result_data", sa.LargeBinary(), nullable=True),
        sa.Column("result_signed", sa.LargeBinary(), nullable=True),
        sa.Column("finished_by", AutoString(length=128), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq", name="uq_fleet_command_seq"),
    )
    op.create_index("ix_fleet_command_device_id", "fleet_command", ["device_id"],
                    unique=False)
    op.create_index("ix_fleet_command_due", "fleet_command", ["state", "next_try_at"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_fleet_command_due", table_name="fleet_command")
    op.drop_index("ix_fleet_command_device_id", table_name="fleet_command")
    op.drop_table("fleet_command")
