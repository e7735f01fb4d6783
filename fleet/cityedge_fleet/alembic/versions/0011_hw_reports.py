"""Hardware reports: ``api_token.vendor`` (the vendor a vendor token speaks for),
``model_registration`` (a device model and its vendor, registered by the security team)
and ``hw_report`` (each uploaded report, whole, with its SHA-256 and uploader). Vendor
tokens made before this have no vendor and see no models until replaced.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_token", sa.Column("vendor", AutoString(length=64), nullable=True))
    op.create_table(
        "model_registration",
        sa.Column("name", AutoString(length=128), nullable=False),
        sa.Column("vendor", AutoString(length=64), nullable=False),
        sa.Column("registered_by", AutoString(length=128), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_model_registration_vendor", "model_registration", ["vendor"])
    op.create_table(
        "hw_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("vendor", AutoString(length=64), nullable=False),
        sa.Column("profile", AutoString(length=48), nullable=False),
        sa.Column("met", sa.Boolean(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("catalogue_version", sa.Integer(), nullable=False),
        sa.Column("tool_version", AutoString(length=64), nullable=False),
        sa.Column("generated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sha256", AutoString(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("uploaded_by", AutoString(length=128), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["model"], ["model_registration.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_hw_report_model_profile", "hw_report", ["model", "profile", "id"])
    op.create_index("ix_hw_report_vendor", "hw_report", ["vendor", "id"])


def downgrade() -> None:
    op.drop_index("ix_hw_report_vendor", table_name="hw_report")
    op.drop_index("ix_hw_report_model_profile", table_name="hw_report")
    op.drop_table("hw_report")
    op.drop_index("ix_model_registration_vendor", table_name="model_registration")
    op.drop_table("model_registration")
    with op.batch_alter_table("api_token") as batch:
        batch.drop_column("vendor")
